"""Every public transform, run the ways production training code runs an optimizer.

The one list of transforms is ``optaxclip._catalog``; the first test below fails when a
public transform is missing from it. Each entry then goes through:

- eager ``tx.init`` and ``jax.jit`` steps with params and state donated, alone and
  inside ``optax.inject_hyperparams`` and ``optax.MultiSteps`` (here), bit-identical to
  the same steps without donation;
- ``nnx.Optimizer`` under ``nnx.jit`` with donation (here);
- ``lax.scan`` carry, ``inject_hyperparams``, ``MultiSteps``, ``masked``, ``partition``
  and ``apply_if_finite`` against references (test_composition.py);
- type-stable state that never retraces (test_state_types.py);
- Orbax save/restore mid-run (test_orbax.py);
- 8 simulated devices (test_multidevice.py) and 2 processes (test_multiprocess.py).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _transforms import BY_NAME, NAMES, linear_batches, linear_params
from flax import nnx

import optaxclip
from optaxclip._catalog import ENTRIES

STEPS = 12
X, Y = linear_batches(STEPS)

# Public functions that are not transforms (they return arrays, trees or reports).
NOT_TRANSFORMS = {
    "block_norms",
    "clip_tree_by_global_norm",
    "diagnose",
    "global_norm",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "skip_nonfinite_microbatch",
    "stats",
    "unitwise_norm",
}


def _public_functions() -> dict[str, object]:
    return {
        name: getattr(optaxclip, name)
        for name in optaxclip.__all__
        if inspect.isfunction(getattr(optaxclip, name))
    }


def test_every_public_transform_has_an_entry_in_the_catalog():
    listed = {entry.factory for entry in ENTRIES}
    for name, fn in _public_functions().items():
        if name in NOT_TRANSFORMS:
            continue
        returns = str(inspect.signature(fn).return_annotation)
        assert "GradientTransformation" in returns, (
            f"optaxclip.{name} is public, returns {returns!r} and is not in NOT_TRANSFORMS"
        )
        assert fn in listed, (
            f"optaxclip.{name} has no entry in optaxclip/_catalog.py: add one, and the "
            "conformance tests cover it"
        )
    assert len(set(NAMES)) == len(NAMES)


def _buffers(tree) -> list[int]:
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def _wrapped(name: str, wrapper: str) -> optax.GradientTransformation:
    entry = BY_NAME[name]
    if wrapper == "inject_hyperparams":
        tx = entry.injected()
        return tx if entry.wraps else optax.chain(tx, optax.adamw(1e-2, weight_decay=1e-4))
    if wrapper == "multisteps":
        return optax.MultiSteps(entry.optimizer(), every_k_schedule=2)
    return entry.optimizer()


def _train(step, params, state):
    for t in range(STEPS):
        params, state = step(params, state, X[t], Y[t])
    return params, state


def _linear_loss(params, x, y):
    f32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    return jnp.mean(jnp.square(x @ (f32["w"] + f32["e"]) + f32["b"] - y))


def _assert_bitwise_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("wrapper", ["plain", "inject_hyperparams", "multisteps"])
@pytest.mark.parametrize("name", NAMES)
def test_donated_jit_steps_after_eager_init_match_undonated_steps_bit_for_bit(name, wrapper):
    tx = _wrapped(name, wrapper)

    def step(params, state, x, y):
        grads = jax.grad(_linear_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = linear_params("mixed")
    state = tx.init(params)  # eagerly, as a training script does
    buffers = _buffers(state)
    assert len(set(buffers)) == len(buffers), "init shares a buffer between state leaves"
    want = _train(jax.jit(step), params, state)

    params, state = linear_params("mixed"), tx.init(linear_params("mixed"))
    donated = jax.jit(step, donate_argnums=(0, 1))
    got = _train(donated, params, state)
    assert params["w"].is_deleted()  # the first step really consumed its inputs
    _assert_bitwise_equal(got, want)
    steps_taken = STEPS // 2 if wrapper == "multisteps" else STEPS
    assert int(optaxclip.stats(got[1])["count"]) == steps_taken


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _nnx_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_under_donating_nnx_jit_matches_the_undonated_run(name):
    def run(jitted):
        model = _MLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, BY_NAME[name].optimizer(), wrt=nnx.Param)
        losses = [float(jitted(model, optimizer, X[t], Y[t])) for t in range(STEPS)]
        return losses, nnx.state(model), nnx.state(optimizer)

    want = run(nnx.jit(_nnx_step))
    got = run(nnx.jit(_nnx_step, donate_argnums=(0, 1)))
    assert np.all(np.isfinite(got[0]))
    _assert_bitwise_equal(got, want)


@pytest.mark.parametrize("name", [entry.name for entry in ENTRIES if entry.static])
def test_inject_hyperparams_without_static_args_names_them_even_when_left_at_default(name):
    entry = BY_NAME[name]
    injected = optax.inject_hyperparams(entry.factory)  # static_args forgotten
    args = (optax.sgd(0.1),) if entry.wraps else ()
    with pytest.raises(TypeError, match=rf"optaxclip\.{entry.factory.__name__}, static_args=\("):
        injected(*args, **entry.defaults).init(linear_params("float32"))
