"""Checkpointing with Orbax loses no training state.

For every transform: train 40 steps, save params and the full optimizer state with
``orbax.checkpoint.StandardCheckpointer``, train 40 more; separately restore (into the
structure of a freshly initialised state) and train the same 40 steps. Both runs must
end bitwise identical, so every adaptive history, sketch, EMA and ring-buffer position
survived the round trip with its dtype (bool, int32, float32, bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _transforms import BY_NAME, NAMES, TRACES, linear_batches, linear_params, train_step
from flax import nnx

import optaxclip

STEPS = 40
X, Y = linear_batches(2 * STEPS)


@pytest.fixture(scope="module")
def checkpointer():
    with ocp.StandardCheckpointer() as ckptr:
        yield ckptr


def assert_bitwise_equal(a, b):
    """Same tree structure (NamedTuple classes included), dtypes, shapes and bytes."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)

    def check(x, y):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        assert x.tobytes() == y.tobytes()

    jax.tree.map(check, a, b)


def _train(step, params, state, start, stop):
    for t in range(start, stop):
        params, state = step(params, state, X[t], Y[t])
    return params, state


def _check_state_is_live(name, state):
    """The saved state is well past warm-up: the round trip has something to lose."""
    case = BY_NAME[name]
    own = state if case.wraps else state[0]
    s = optaxclip.stats(state)
    assert int(s["count"]) == STEPS
    if name != "skip_nonfinite" and case.clips:
        assert int(s["clip_count"]) > 0  # clipped (or skipped) the spikes at least
    if name == "autoclip_window":
        assert np.all(np.isfinite(own.history))  # the ring buffer has wrapped
    elif name == "autoclip_sketch":
        assert int(own.history.sum()) == STEPS
    elif name == "zclip":
        assert float(own.mean) > 0 and float(own.var) > 0  # the EMA is running
    elif name == "adagc":
        assert np.all(np.isfinite(own.gamma))
    elif name == "skip_spikes":
        assert int(own.size) == 6 and int(own.head) == STEPS % 6


@pytest.mark.parametrize("name", NAMES)
def test_restored_run_is_bitwise_identical_to_the_uninterrupted_run(name, checkpointer, tmp_path):
    tx, step = train_step(name)
    params0 = linear_params("mixed")  # float32 and bfloat16 leaves
    params, state = _train(step, params0, tx.init(params0), 0, STEPS)
    _check_state_is_live(name, state)
    path = tmp_path / "checkpoint"
    checkpointer.save(path, {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    want_params, want_state = _train(step, params, state, STEPS, 2 * STEPS)
    traces = TRACES[name]

    # Restore into the structure of a fresh state, as a new process would.
    fresh = params0, tx.init(params0)
    target = jax.eval_shape(lambda: {"params": fresh[0], "opt_state": fresh[1]})
    restored = checkpointer.restore(path, target)
    assert_bitwise_equal(restored, {"params": params, "opt_state": state})
    got_params, got_state = _train(
        step, restored["params"], restored["opt_state"], STEPS, 2 * STEPS
    )
    assert_bitwise_equal(got_params, want_params)
    assert_bitwise_equal(got_state, want_state)
    assert TRACES[name] == traces  # the restored state has the saved avals: no retrace


@pytest.mark.parametrize("name", NAMES)
def test_no_state_holds_a_zero_size_array(name):
    # Orbax refuses to save zero-size arrays ("Cannot save arrays with zero size").
    params = linear_params("mixed")
    states = [BY_NAME[name].optimizer().init(params)]
    if name == "skip_spikes":
        states.append(optaxclip.skip_spikes(optax.sgd(0.1), use_loss=False).init(params))
    for leaf in jax.tree.leaves(states):
        assert leaf.size > 0


class Linear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.w(x)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
    optimizer.update(model, grads)


def test_nnx_checkpoint_recipe_restores_the_optimizer_exactly(checkpointer, tmp_path):
    # The Flax NNX recipe: save nnx.state(model) and nnx.state(optimizer), restore into
    # the state of freshly built ones, nnx.update them.
    tx = optaxclip.skip_nonfinite(
        optax.chain(optaxclip.autoclip(25.0, history=6), optaxclip.zclip(warmup_steps=3),
                    optax.adamw(1e-2))
    )

    def build(seed):
        model = Linear(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = build(0)
    for t in range(STEPS):
        _nnx_step(model, optimizer, X[t], Y[t])
    path = tmp_path / "nnx"
    checkpointer.save(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
    checkpointer.wait_until_finished()
    for t in range(STEPS, 2 * STEPS):
        _nnx_step(model, optimizer, X[t], Y[t])

    new_model, new_optimizer = build(1)
    target = {"model": nnx.state(new_model), "optimizer": nnx.state(new_optimizer)}
    restored = checkpointer.restore(path, jax.eval_shape(lambda: target))
    nnx.update(new_model, restored["model"])
    nnx.update(new_optimizer, restored["optimizer"])
    for t in range(STEPS, 2 * STEPS):
        _nnx_step(new_model, new_optimizer, X[t], Y[t])

    assert_bitwise_equal(nnx.state(new_model), nnx.state(model))
    assert_bitwise_equal(nnx.state(new_optimizer), nnx.state(optimizer))
    s = optaxclip.stats(new_optimizer.opt_state)
    assert int(s["skip_nonfinite/count"]) == 2 * STEPS
    for key, value in optaxclip.stats(optimizer.opt_state).items():
        np.testing.assert_array_equal(s[key], value)
