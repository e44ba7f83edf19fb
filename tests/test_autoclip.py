"""AutoClip: the threshold is the percentile of the norm history, checked against NumPy."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import DIRECTION, jit_steps, norms64, run_scan, scaled, scan_steps

import optaxclip
from optaxclip._autoclip import SKETCH_SLOTS


def spiky_norms(steps: int, seed: int) -> np.ndarray:
    """Log-normal norms with a drift, large spikes, NaN and inf steps (some early)."""
    rng = np.random.default_rng(seed)
    norms = rng.lognormal(0.0, 0.4, steps) * np.linspace(1.0, 3.0, steps)
    spikes = rng.choice(steps, steps // 15, replace=False)
    norms[spikes] *= rng.uniform(5, 100, spikes.size)
    norms[[2, steps // 8, steps // 8 + 1, steps // 2]] = np.nan
    norms[[7, 3 * steps // 4]] = np.inf
    return norms.astype(np.float32)


def autoclip_reference(norms, percentile, history, warmup_steps, max_norm):
    """AutoClip written out in float64: threshold, scale and decision per step.

    Only finite, non-zero norms are recorded (and counted by the warm-up).
    """
    recorded, thresholds, scales, clipped = [], [], [], []
    for g in norms.astype(np.float64):
        finite = math.isfinite(g)
        takes = finite and g != 0
        if takes:
            recorded.append(g)
        window = recorded if history is None else recorded[-history:]
        in_warmup = len(recorded) - takes < warmup_steps
        t = math.inf if in_warmup or not window else np.percentile(window, percentile)
        if max_norm is not None:
            t = min(t, max_norm)
        thresholds.append(t)
        over = finite and g > t
        clipped.append(over)
        scales.append(t / g if over else 1.0)
    return np.array(thresholds), np.array(scales), np.array(clipped)


# (percentile, history, warmup_steps, max_norm): exact windows, then the sketch.
WINDOW_CONFIGS = [(10.0, 50, 5, None), (75.0, 7, 0, 2.0), (0.0, 20, 0, None), (100.0, 3, 3, 20.0)]
SKETCH_CONFIGS = [(10.0, None, 3, None), (90.0, None, 0, 5.0), (50.0, None, 0, None)]
NORMS = spiky_norms(320, seed=1)


@functools.cache
def acceptance_runs():
    """Every configuration over NORMS, compiled as one program (one compile, not seven)."""
    txs = [
        optaxclip.autoclip(p, history=h, warmup_steps=w, max_norm=m)
        for p, h, w, m in WINDOW_CONFIGS + SKETCH_CONFIGS
    ]
    runs = jax.jit(lambda xs: [scan_steps(tx, xs) for tx in txs])(NORMS)
    return [(final, [np.asarray(x) for x in per_step]) for final, per_step in runs]


def check_against_reference(index, rtol):
    percentile, history, warmup_steps, max_norm = (WINDOW_CONFIGS + SKETCH_CONFIGS)[index]
    norms = NORMS
    _, (measured, out_norm, threshold, clipped) = acceptance_runs()[index]
    finite = np.isfinite(norms)
    np.testing.assert_allclose(measured[finite], norms[finite], rtol=1e-6)
    assert np.all(~np.isfinite(measured[~finite]))
    ref_t, ref_scale, ref_clipped = autoclip_reference(
        measured, percentile, history, warmup_steps, max_norm
    )
    np.testing.assert_allclose(threshold, ref_t, rtol=rtol)
    scale = out_norm[finite] / measured[finite]
    np.testing.assert_allclose(scale, ref_scale[finite], rtol=rtol)
    # Propagate: NaN/inf steps come out as they went in, unclipped.
    assert not np.any(clipped[~finite])
    assert np.all(~np.isfinite(out_norm[~finite]))
    # Decisions, away from the sketch's error band (everywhere for the exact window).
    decisive = np.abs(measured - ref_t) > 2 * rtol * ref_t
    np.testing.assert_array_equal(clipped[decisive], ref_clipped[decisive])
    assert 0 < ref_clipped.sum() < finite.sum()  # the sequence exercises both outcomes


@pytest.mark.parametrize("index", range(len(WINDOW_CONFIGS)), ids=lambda i: str(WINDOW_CONFIGS[i]))
def test_window_matches_numpy_percentile_every_step(index):
    check_against_reference(index, rtol=1e-5)


@pytest.mark.parametrize("index", range(len(SKETCH_CONFIGS)), ids=lambda i: str(SKETCH_CONFIGS[i]))
def test_sketch_within_one_percent_of_full_history_percentile(index):
    check_against_reference(len(WINDOW_CONFIGS) + index, rtol=1e-2)


def test_first_step_never_clips_even_with_the_sketch():
    tx = optaxclip.autoclip(0.0)
    out, state = jax.jit(tx.update)({"a": jnp.array([3.0, 4.0])}, tx.init(None))
    np.testing.assert_array_equal(out["a"], [3.0, 4.0])
    assert not state.stats.clipped
    assert float(state.stats.threshold) == 5.0  # the sketch keeps the extremes exactly


def test_sketch_over_100k_steps_is_accurate_and_constant_size():
    norms = np.random.default_rng(3).lognormal(0.0, 1.0, 100_000).astype(np.float32)
    inject = optax.inject_hyperparams(optaxclip.autoclip, static_args=("history", "warmup_steps"))
    tx = inject(percentile=10.0)
    params = [jnp.zeros(1)]
    state0 = tx.init(params)

    def step(state, s):
        return tx.update([s[None]], state, params)[1], None

    # One more step with a NaN norm reads the percentile without recording anything.
    def query(state, percentile):
        state = state._replace(hyperparams={**state.hyperparams, "percentile": percentile})
        return tx.update([jnp.array([jnp.nan])], state, params)[1].inner_state.stats.threshold

    final = jax.jit(lambda st, xs: jax.lax.scan(step, st, xs)[0])(state0, norms)
    full = norms.astype(np.float64)
    np.testing.assert_allclose(
        final.inner_state.stats.threshold, np.percentile(full, 10.0), rtol=1e-2
    )
    query = jax.jit(query)
    for p in (0.0, 1.0, 50.0, 99.0, 99.9, 100.0):
        np.testing.assert_allclose(query(final, p), np.percentile(full, p), rtol=1e-2)
    np.testing.assert_allclose(query(final, 0.0), full.min(), rtol=1e-7)
    np.testing.assert_allclose(query(final, 100.0), full.max(), rtol=1e-7)

    def nbytes(state):
        return sum(x.nbytes for x in jax.tree.leaves(state.inner_state))

    assert nbytes(final) == nbytes(state0) <= 64 * 1024
    assert final.inner_state.history.size == SKETCH_SLOTS
    assert int(final.inner_state.history.sum()) == 100_000


@hypothesis.given(
    st.lists(
        # No subnormals: XLA on CPU flushes them to zero.
        st.one_of(st.floats(2**-60, 1e6, width=32), st.sampled_from([0.0, 1.0, 2.0])),
        min_size=12,
        max_size=12,
    ),
    st.floats(0.0, 100.0, width=32),
)
def test_window_percentile_equals_numpy_on_any_sequence(values, percentile):
    norms = np.asarray(values, np.float32)
    final, (_, _, threshold, _) = _run_window_5(norms, percentile)
    for t in range(len(norms)):
        # The window holds the last 5 recorded norms; zeros are never recorded.
        recorded = norms[: t + 1][norms[: t + 1] != 0].astype(np.float64)
        window = recorded[-5:]
        if window.size == 0:
            assert threshold[t] == np.inf
            continue
        want = np.percentile(window, percentile)
        # float32 rounding of the interpolation is relative to the values interpolated.
        np.testing.assert_allclose(threshold[t], want, rtol=1e-5, atol=1e-6 * window.max())


_INJECTED_WINDOW = optax.inject_hyperparams(
    optaxclip.autoclip, static_args=("history", "warmup_steps")
)


@jax.jit
def _run_window_5_jit(norms, percentile):
    tx = _INJECTED_WINDOW(percentile=percentile, history=5)
    params = [jnp.zeros(1)]

    def step(state, s):
        _, state = tx.update([s[None]], state, params)
        s_ = state.inner_state.stats
        return state, (s_.norm, s_.clipped_norm, s_.threshold, s_.clipped)

    return jax.lax.scan(step, tx.init(params), norms)


def _run_window_5(norms, percentile):
    final, per_step = _run_window_5_jit(norms, jnp.float32(percentile))
    return final, [np.asarray(x) for x in per_step]


def test_jitted_update_compiles_once_and_follows_the_rule():
    norms = spiky_norms(50, seed=4)
    tx = optaxclip.autoclip(25.0, history=6, max_norm=4.0)
    traces, thresholds, measured = jit_steps(tx, norms)
    assert traces == 1  # the state is type-stable: no retrace on step 2
    want, _, _ = autoclip_reference(np.array(measured), 25.0, 6, 0, 4.0)
    np.testing.assert_allclose(thresholds, want, rtol=1e-5)


def test_inject_hyperparams_matches_direct_and_can_be_changed():
    norms = spiky_norms(40, seed=5)
    kwargs = dict(history=8, warmup_steps=2, max_norm=3.0)
    injected = optax.inject_hyperparams(
        optaxclip.autoclip, static_args=("history", "warmup_steps")
    )(30.0, **kwargs)
    state, (measured, _, got, _) = run_scan(injected, norms)
    assert set(state.hyperparams) == {"percentile", "max_norm"}
    want = autoclip_reference(measured, 30.0, 8, 2, 3.0)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Raising the percentile to 100 and the cap to inf: nothing finite clips any more.
    hyperparams = {**state.hyperparams, "percentile": 100.0, "max_norm": jnp.inf}
    state = state._replace(hyperparams=jax.tree.map(jnp.float32, hyperparams))
    out, state = jax.jit(injected.update)(scaled(1e3), state, DIRECTION)
    assert not state.inner_state.stats.clipped
    np.testing.assert_allclose(np.linalg.norm(norms64(out)), 1e3, rtol=1e-6)


def test_bf16_in_bf16_out_and_complex_leaves():
    tx = optaxclip.autoclip(0.0, history=4)
    grads1 = {"h": jnp.full((8,), 1.0, jnp.bfloat16), "z": jnp.array([3 + 4j], jnp.complex64)}
    grads2 = jax.tree.map(lambda x: x * 10, grads1)
    update = jax.jit(tx.update)
    _, state = update(grads1, tx.init(grads1))
    out, state = update(grads2, state)
    assert out["h"].dtype == jnp.bfloat16 and out["z"].dtype == jnp.complex64
    n1 = math.sqrt(8 + 25)  # |3 + 4j| = 5
    np.testing.assert_allclose(float(state.stats.threshold), n1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["z"]), [(3 + 4j)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["h"], np.float32), 1.0, rtol=1e-2)


def test_none_leaves_and_empty_tree_pass_through():
    tx = optaxclip.autoclip(50.0, history=3)
    grads = {"a": jnp.array([3.0, 4.0]), "b": None}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["b"] is None
    out, state = jax.jit(tx.update)({}, tx.init({}))
    assert out == {} and int(state.stats.count) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"percentile": -1.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
        ({"history": 0}, "history"),
        ({"history": -4}, "history"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"nonfinite": "skip"}, "nonfinite"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optaxclip.autoclip(**kwargs)


def test_integer_leaf_is_a_type_error():
    tx = optaxclip.autoclip()
    with pytest.raises(TypeError, match="'i'"):
        tx.update({"i": jnp.array([1, 2])}, tx.init(None))


@pytest.mark.parametrize("history", [None, 4])
def test_nonfinite_step_leaves_history_untouched(history):
    tx = optaxclip.autoclip(50.0, history=history, nonfinite="zero")
    update = jax.jit(tx.update)
    state = tx.init(None)
    for g in [1.0, 2.0, 3.0]:
        _, state = update([jnp.array([g])], state)
    for bad in [jnp.nan, jnp.inf, -jnp.inf]:
        out, after = update([jnp.array([bad])], state)
        np.testing.assert_array_equal(out[0], [0.0])
        for field in set(after._fields) - {"stats"}:  # history, lowest, highest, recorded
            np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
        assert int(after.stats.nonfinite_count) == int(state.stats.nonfinite_count) + 1
        np.testing.assert_allclose(after.stats.threshold, 2.0, rtol=1e-2)  # median of 1, 2, 3
        state = after
    _, state = update([jnp.array([4.0])], state)
    # The median of 1..4: NaN/inf were never recorded (the sketch is within 1%).
    np.testing.assert_allclose(state.stats.threshold, 2.5, rtol=1e-2)


def test_warmup_counts_finite_norms_and_keeps_max_norm():
    tx = optaxclip.autoclip(0.0, history=8, warmup_steps=2, max_norm=5.0)
    update = jax.jit(tx.update)
    state = tx.init(None)
    thresholds = []
    for g in [3.0, float("nan"), 9.0, 4.0]:
        _, state = update([jnp.array([g])], state)
        thresholds.append(float(state.stats.threshold))
    # Steps 1-3 hold 2 finite norms (warm-up: only max_norm); step 4 clips at the min.
    assert thresholds == [5.0, 5.0, 5.0, 3.0]


@pytest.mark.parametrize("history", [None, 8])
def test_zero_norms_are_not_recorded_and_do_not_zero_later_updates(history):
    # A zero-gradient start (frozen model, zero-initialised head): a history of zeros
    # would put the 10th percentile at 0 and zero every later update.
    tx = optaxclip.autoclip(10.0, history=history)
    update = jax.jit(tx.update)
    init = state = tx.init(None)
    for _ in range(5):
        out, state = update([jnp.zeros(1)], state)
        np.testing.assert_array_equal(out[0], [0.0])
        assert float(state.stats.threshold) == math.inf  # nothing recorded yet
        assert not state.stats.clipped
    for field in set(state._fields) - {"stats"}:  # history, lowest, highest, recorded
        np.testing.assert_array_equal(getattr(state, field), getattr(init, field))
    for _ in range(20):
        out, state = update([jnp.ones(1)], state)
        np.testing.assert_array_equal(out[0], [1.0])  # numpy.percentile([1, ..., 1], 10) = 1
        assert float(state.stats.threshold) == 1.0
    assert int(state.recorded) == 20 and int(state.stats.count) == 25
    assert float(state.lowest) == 1.0 and float(state.highest) == 1.0


def test_warmup_counts_nonzero_norms_only():
    tx = optaxclip.autoclip(0.0, history=8, warmup_steps=2, max_norm=5.0)
    update = jax.jit(tx.update)
    state = tx.init(None)
    thresholds = []
    for g in [0.0, 3.0, 0.0, 0.0, 9.0, 4.0]:
        _, state = update([jnp.array([g])], state)
        thresholds.append(float(state.stats.threshold))
    # The warm-up is the two non-zero norms 3 and 9; then the minimum of {3, 9, 4}.
    assert thresholds == [5.0, 5.0, 5.0, 5.0, 5.0, 3.0]


@pytest.mark.parametrize("history, rtol", [(4, 1e-5), (None, 1e-2)])
def test_threshold_with_zero_norms_is_numpy_percentile_of_the_nonzero_history(history, rtol):
    norms = np.array([0, 0, 3, 0, 1, 4, 0, 0, 1, 5, 9, 2, 0, 6, 0.5, 0], np.float32)
    kwargs = dict(history=history, warmup_steps=2, max_norm=None)
    tx = optaxclip.autoclip(30.0, **kwargs)
    _, thresholds, measured = jit_steps(tx, norms)
    # Independent rule: numpy.percentile over the finite non-zero norms so far (the
    # current one included when it is recorded), the last 4 of them for the window.
    want = []
    for t in range(len(norms)):
        recorded = [float(g) for g in measured[: t + 1] if g != 0]
        window = recorded if history is None else recorded[-history:]
        in_warmup = len(recorded) - (measured[t] != 0) < 2
        want.append(math.inf if in_warmup or not window else np.percentile(window, 30.0))
    np.testing.assert_allclose(thresholds, want, rtol=rtol)
    assert np.isfinite(thresholds[-1]) and thresholds[-1] > 0


def test_nonfinite_error_policy_raises_naming_the_step():
    tx = optaxclip.autoclip(nonfinite="error")
    update = jax.jit(tx.update)
    _, state = update([jnp.array([1.0])], tx.init(None))
    with pytest.raises(Exception, match="step 2"):
        jax.block_until_ready(update([jnp.array([jnp.nan])], state))


def test_stats_reads_autoclip_state_in_a_chain():
    tx = optax.chain(optaxclip.autoclip(history=4), optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    _, state = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    s = optaxclip.stats(state)
    assert float(s["norm"]) == 5.0 and float(s["threshold"]) == 5.0
