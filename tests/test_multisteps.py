"""skip_nonfinite_microbatch: the should_skip_update_fn of optax.MultiSteps, run inside
real MultiSteps training loops (jitted, params and state donated) and checked against
the accumulation written out in float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64

import optaxclip

LR = 0.5
K = 2
RNG = np.random.default_rng(0)
PARAMS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.float32)}


def _micro(scale=1.0, dtype=np.float32):
    return {
        "w": (RNG.normal(size=(3, 2)) * scale).astype(dtype),
        "b": (RNG.normal(size=(2,)) * scale).astype(dtype),
    }


def _with_norm(norm, dtype=np.float32):
    g = _micro(dtype=np.float64)
    return {k: (v * (norm / norm64(g))).astype(dtype) for k, v in g.items()}


def _poisoned(value):
    g = _micro()
    g["w"][1, 0] = value
    return g


def _train(micro_batches, should_skip=optaxclip.skip_nonfinite_microbatch, params=PARAMS):
    """Params and state after a donated, jitted MultiSteps(sgd) run over the micro-batches."""
    tx = optax.MultiSteps(optax.sgd(LR), every_k_schedule=K, should_skip_update_fn=should_skip)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.array, params)  # private buffers: donation consumes them
    state = tx.init(params)
    for g in micro_batches:
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
    return params, state


def _expected(micro_batches, keep):
    """float64: SGD on the mean of each K consecutive kept micro-batches."""
    kept = [g for g in micro_batches if keep(g)]
    params = {k: np64(v) for k, v in PARAMS.items()}
    for i in range(0, len(kept) - K + 1, K):
        for k in params:
            params[k] = params[k] - LR * np.mean([np64(g[k]) for g in kept[i : i + K]], axis=0)
    return params


def _finite(g):
    return all(np.all(np.isfinite(np64(x))) for x in g.values())


def test_nan_and_inf_micro_batches_are_dropped_before_they_reach_the_accumulator():
    batches = [_micro(), _poisoned(np.nan), _micro(), _micro(), _poisoned(np.inf), _micro()]
    batches += [_poisoned(-np.inf), _micro(), _micro()]
    params, state = _train(batches)
    want = _expected(batches, _finite)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-6, atol=1e-7)
    assert int(state.gradient_step) == 3 and int(state.mini_step) == 0
    # The run is the run without the bad micro-batches, bit for bit.
    clean_params, clean_state = _train([g for g in batches if _finite(g)])
    for k in want:
        assert np.asarray(params[k]).tobytes() == np.asarray(clean_params[k]).tobytes()
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b), state.acc_grads, clean_state.acc_grads
    )
    # The last micro-batch was finite: its norm is what skip_state reports.
    np.testing.assert_allclose(state.skip_state["norm"], norm64(batches[-1]), rtol=1e-6)
    assert not bool(state.skip_state["should_skip"])


def test_without_the_predicate_one_nan_micro_batch_poisons_the_step():
    # The control: what the predicate prevents.
    params, _ = _train([_micro(), _poisoned(np.nan)], should_skip=None)
    assert np.isnan(np.asarray(params["w"])).any()


def test_a_finite_micro_batch_whose_squared_norm_overflows_is_kept():
    # Norm 1e20 in float32: its square overflows, yet nothing in it is NaN or inf.
    huge = _micro(scale=1e20)
    batches = [_micro(), huge, _micro(), _micro()]
    skip, aux = optaxclip.skip_nonfinite_microbatch(jax.tree.map(jnp.asarray, huge), 0, None)
    assert not bool(skip)
    np.testing.assert_allclose(aux["norm"], norm64(huge), rtol=1e-6)
    params, state = _train(batches)
    want = _expected(batches, _finite)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-6)
    assert int(state.gradient_step) == 2
    # Optax's skip_large_updates squares in float32: inf, so even an infinite limit drops it.
    optax_skip, optax_aux = optax.skip_large_updates(
        jax.tree.map(jnp.asarray, huge), 0, None, jnp.inf
    )
    assert bool(optax_skip) and np.isinf(float(optax_aux["norm_squared"]))


def test_max_norm_drops_large_fp16_micro_batches_by_their_true_norm():
    # fp16 micro-batches of norm ~300 and ~3000 with a limit of 1000: the first is kept,
    # the second dropped. Optax's fp16 squares overflow at a norm of 256: it drops both.
    ok, big = _with_norm(300.0, np.float16), _with_norm(3000.0, np.float16)
    assert 256 < norm64(ok) < 1000 < norm64(big)
    batches = [_micro(dtype=np.float16), ok, big, _micro(dtype=np.float16), big, ok]
    skip = functools.partial(optaxclip.skip_nonfinite_microbatch, max_norm=1000.0)
    params, state = _train(batches, should_skip=skip)
    kept = [g for g in batches if norm64(g) <= 1000.0]
    assert len(kept) == 4
    # MultiSteps hands the inner SGD the float32 mean cast to the gradients' fp16.
    want = {k: np64(v) for k, v in PARAMS.items()}
    for i in (0, 2):
        for k in want:
            mean = np.mean([np64(g[k]) for g in kept[i : i + 2]], axis=0)
            want[k] = want[k] - LR * np64(mean.astype(np.float16))
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=2e-3)
    assert int(state.gradient_step) == 2
    optax_skip, _ = optax.skip_large_updates(jax.tree.map(jnp.asarray, ok), 0, None, 1000.0**2)
    assert bool(optax_skip)


def test_a_max_norm_schedule_is_read_at_the_gradient_step():
    # Limit 10 for the first gradient step, 1000 afterwards: a norm-100 micro-batch is
    # dropped while gradient_step is 0 and kept later.
    medium = _with_norm(100.0)
    limit = lambda step: jnp.where(step < 1, 10.0, 1000.0)  # noqa: E731
    skip = functools.partial(optaxclip.skip_nonfinite_microbatch, max_norm=limit)
    batches = [_micro(), medium, _micro(), medium, _micro()]
    params, state = _train(batches, should_skip=skip)
    want = _expected([batches[0], batches[2], batches[3], batches[4]], lambda g: True)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=1e-6, atol=1e-7)
    assert int(state.gradient_step) == 2


def test_the_predicate_has_optaxs_signature_and_a_type_stable_aux():
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    at_init = jax.eval_shape(optaxclip.skip_nonfinite_microbatch, zeros, jnp.int32(0), zeros)
    later = jax.eval_shape(
        optaxclip.skip_nonfinite_microbatch, _micro(dtype=np.float16), jnp.int32(3), None
    )
    assert at_init == later
    skip, aux = at_init
    assert (skip.shape, skip.dtype) == ((), jnp.bool_)
    assert set(aux) == {"should_skip", "norm"} and aux["norm"].dtype == jnp.float32


def test_bad_input_names_the_leaf_or_the_argument():
    with pytest.raises(TypeError, match=r"updates leaf \['steps'\] has dtype int32"):
        optaxclip.skip_nonfinite_microbatch({"steps": jnp.array([1, 2])}, 0, None)
    with pytest.raises(ValueError, match="max_norm"):
        optaxclip.skip_nonfinite_microbatch(PARAMS, 0, None, max_norm=-1.0)
    with pytest.raises(TypeError, match="max_norm"):
        optaxclip.skip_nonfinite_microbatch(PARAMS, 0, None, max_norm="big")
