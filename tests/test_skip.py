"""skip_nonfinite and skip_spikes: skip decisions against the rule written out in
float64 Python, and the wrapped optimizer's state left bit for bit as it was."""

import math
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

PARAMS = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def spikes_reference(norms, losses, *, window, num_sigmas, min_history, count_skipped=True):
    """The skip_spikes rule in float64 Python: per step (skipped, norm thr, loss thr).

    ``count_skipped=True`` is the references' rule (every finite value counts);
    otherwise only the values of taken steps count, unless skipped ones are more than
    half the window. ``num_sigmas`` is a number or one number per step.
    """

    def threshold(history, num_sigmas):
        if len(history) < min_history:
            return math.inf
        values = [v for v, _ in history]
        skipped = sum(1 for _, s in history if s)
        if not count_skipped and 2 * skipped <= len(history):
            values = [v for v, s in history if not s]
        h = np.asarray(values, np.float64)
        return float(h.mean() + num_sigmas * max(h.std(), 1e-6))  # population std

    norm_hist, loss_hist = deque(maxlen=window), deque(maxlen=window)
    out = []
    for t, g in enumerate(norms):
        loss = None if losses is None else losses[t]
        sigmas = num_sigmas[t] if isinstance(num_sigmas, (list, tuple)) else num_sigmas
        t_norm = threshold(norm_hist, sigmas)
        t_loss = math.inf if loss is None else threshold(loss_hist, sigmas)
        finite = math.isfinite(g) and (loss is None or math.isfinite(loss))
        skipped = not finite or g > t_norm or (loss is not None and loss > t_loss)
        if finite:  # spikes are appended too, marked; NaN/inf never
            norm_hist.append((g, skipped))
            if loss is not None:
                loss_hist.append((loss, skipped))
        out.append((skipped, t_norm, t_loss))
    return out


def _synthetic(seed, n=320):
    rng = np.random.default_rng(seed)
    norms = 1.0 + 0.05 * rng.standard_normal(n)
    norms[200:] *= 3.0  # a lasting shift: skipped at first, then the new baseline
    for t in (5, 40, 90, 91, 150, 250):  # 5 falls before min_history: not skipped
        norms[t] *= 30.0
    norms[[60, 120]] = np.nan
    norms[180] = np.inf
    losses = 2.0 + 0.1 * rng.standard_normal(n)
    for t in (70, 210, 211):
        losses[t] *= 5.0
    losses[[100, 260]] = np.nan
    losses[300] = -np.inf
    # What the transform sees: float32 values (a one-element leaf's norm is |g| exactly).
    return np.float32(norms).astype(np.float64), np.float32(losses).astype(np.float64)


def _run_spikes(norms, losses, use_loss, **kwargs):
    tx = optaxclip.skip_spikes(optax.sgd(1.0), use_loss=use_loss, **kwargs)

    def body(state, x):
        g, loss = x
        extra = {"loss": loss} if use_loss else {}
        u, state = tx.update({"w": g[None]}, state, {"w": jnp.zeros(1)}, **extra)
        s = state.stats
        return state, (u["w"][0], s.clipped, s.threshold, state.loss_threshold)

    xs = (jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
    state, out = jax.jit(lambda s: jax.lax.scan(body, s, xs))(tx.init({"w": jnp.zeros(1)}))
    return state, jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("count_skipped", [False, True], ids=["default", "references"])
@pytest.mark.parametrize("use_loss", [False, True], ids=["norm", "norm_and_loss"])
def test_skip_decisions_and_thresholds_match_the_float64_rule_over_320_steps(
    use_loss, count_skipped
):
    norms, losses = _synthetic(0)
    kw = dict(window=32, num_sigmas=4.0, min_history=16, count_skipped=count_skipped)
    state, (updates, skipped, thr_norm, thr_loss) = _run_spikes(norms, losses, use_loss, **kw)
    ref = spikes_reference(norms, losses if use_loss else None, **kw)
    ref_skip = np.array([r[0] for r in ref])
    for name, got, want in [
        ("norm", thr_norm, [r[1] for r in ref]),
        ("loss", thr_loss, [r[2] for r in ref]),
    ]:
        want = np.asarray(want)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, err_msg=name)
    # The data keep clear of ties, so float32 and float64 must take the same decisions.
    for column, values in [(1, norms), (2, losses)]:
        thr = np.array([r[column] for r in ref])
        ok = np.isfinite(thr) & np.isfinite(values)
        assert not ok.any() or np.min(np.abs(values[ok] - thr[ok]) / np.abs(thr[ok])) > 1e-4
    np.testing.assert_array_equal(skipped, ref_skip)
    # The test exercises every path: spikes, NaN/inf, the shift and its adoption.
    assert ref_skip[[40, 90, 91, 150, 250, 60, 120, 180, 200]].all()
    assert not ref_skip[5] and not ref_skip[-15:].any()
    if use_loss:
        assert ref_skip[[70, 210, 211, 100, 260, 300]].all()
    # Skipped steps emit zeros; the others go through sgd(1.0) untouched.
    np.testing.assert_array_equal(updates, np.where(ref_skip, 0.0, -np.float32(norms)))
    assert int(state.stats.clip_count) == ref_skip.sum()
    assert int(state.stats.nonfinite_count) == 3 and int(state.stats.count) == len(norms)
    assert int(state.size) == 32


def _adam_steps(tx, grads_seq):
    """Runs ``tx`` over the gradients with one compiled update; returns every state."""
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    states, outs = [state], []
    for g in grads_seq:
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, PARAMS)
        states.append(state)
        outs.append(u)
    return states, outs


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_nonfinite_leaves_adam_state_bitwise_and_resumes_as_if_nothing_happened(bad):
    tx = optaxclip.skip_nonfinite(optax.adam(1e-2))
    good1, good2 = [0.1, -0.2, 0.3], [0.2, 0.1, -0.4]
    states, outs = _adam_steps(tx, [good1, [0.1, bad, 0.0], good2])
    assert _leaves_equal(states[2].inner_state, states[1].inner_state)  # count included
    np.testing.assert_array_equal(outs[1]["w"], np.zeros(3, np.float32))
    assert int(states[2].stats.clip_count) == 1 and bool(states[2].stats.clipped)
    left_out, outs_b = _adam_steps(tx, [good1, good2])
    assert _leaves_equal(states[3].inner_state, left_out[2].inner_state)
    np.testing.assert_array_equal(outs[2]["w"], outs_b[1]["w"])
    # And the same as adam on its own, never shown the bad step.
    plain, outs_c = _adam_steps(optax.adam(1e-2), [good1, good2])
    np.testing.assert_allclose(outs[2]["w"], outs_c[1]["w"], rtol=1e-7)


def test_skip_spikes_leaves_adam_state_bitwise_and_resumes_as_if_nothing_happened():
    tx = optaxclip.skip_spikes(optax.adam(1e-2), window=8, min_history=4, num_sigmas=3.0)
    rng = np.random.default_rng(1)
    warm = [list(rng.normal(size=3) * 0.1 + 1.0) for _ in range(6)]
    spike, after = [50.0, -40.0, 60.0], [1.0, 0.95, 1.05]
    states, outs = _adam_steps(tx, [*warm, spike, after])
    assert bool(states[7].stats.clipped) and not bool(states[8].stats.clipped)
    assert _leaves_equal(states[7].inner_state, states[6].inner_state)
    np.testing.assert_array_equal(outs[6]["w"], np.zeros(3, np.float32))
    left_out, outs_b = _adam_steps(tx, [*warm, after])
    assert not bool(left_out[7].stats.clipped)
    assert _leaves_equal(states[8].inner_state, left_out[7].inner_state)
    np.testing.assert_array_equal(outs[7]["w"], outs_b[6]["w"])


def test_skip_nonfinite_in_a_50_step_scan_equals_adam_on_the_finite_steps():
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(50, 3)).astype(np.float32)
    bad_steps = [3, 17, 18, 40]
    grads[bad_steps, 1] = np.nan
    tx = optaxclip.skip_nonfinite(optax.adam(1e-2))

    def body(carry, g):
        params, state = carry
        u, state = tx.update({"w": g}, state, params)
        return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.asarray(grads)))(
        (PARAMS, tx.init(PARAMS))
    )
    adam = optax.adam(1e-2)
    ref_params, ref_state = PARAMS, adam.init(PARAMS)
    for g in np.delete(grads, bad_steps, axis=0):
        u, ref_state = adam.update({"w": jnp.asarray(g)}, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, u)
    np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6)
    assert int(state.inner_state[0].count) == 46
    assert int(state.stats.clip_count) == 4 and int(state.stats.count) == 50
    assert float(state.stats.threshold) == math.inf


def test_skip_spikes_num_sigmas_can_be_injected():
    inject = optax.inject_hyperparams(optaxclip.skip_spikes, static_args=("window", "min_history"))
    tx = inject(optax.sgd(1.0), window=8, min_history=4, num_sigmas=6.0)
    update = jax.jit(tx.update)
    norms = [1.0, 1.2, 0.9, 1.1, 1.0, 1.6, 1.05, 1.3]
    sigmas = [6.0] * 5 + [1.0] * 3
    state = tx.init({"w": jnp.zeros(1)})
    got = []
    for g, ns in zip(norms, sigmas, strict=True):
        state.hyperparams["num_sigmas"] = jnp.asarray(ns)
        _, state = update({"w": jnp.array([g])}, state, {"w": jnp.zeros(1)})
        got.append(
            (bool(state.inner_state.stats.clipped), float(state.inner_state.stats.threshold))
        )
    norms32 = np.float32(norms).astype(np.float64)
    ref = spikes_reference(
        norms32, None, window=8, num_sigmas=sigmas, min_history=4, count_skipped=False
    )
    for t, want in enumerate(ref):  # each step with its own num_sigmas
        assert got[t][0] == want[0], t
        assert got[t][1] == pytest.approx(want[1], rel=1e-5), t
    assert got[5][0] and not got[4][0]  # 1.6 is a spike at 1 sigma, not at 6


def test_structural_ints_injected_as_arrays_ask_for_static_args():
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(optaxclip.skip_spikes)(optax.sgd(1.0)).init({"w": jnp.ones(1)})


def test_skip_nonfinite_works_under_inject_hyperparams():
    tx = optax.inject_hyperparams(optaxclip.skip_nonfinite)(optax.sgd(1.0))
    state = tx.init({"w": jnp.zeros(2)})
    u, state = jax.jit(tx.update)({"w": jnp.array([jnp.nan, 1.0])}, state)
    np.testing.assert_array_equal(u["w"], [0.0, 0.0])
    assert int(optaxclip.stats(state)["clip_count"]) == 1


def test_use_loss_without_a_loss_raises_and_says_how_to_pass_it():
    tx = optaxclip.skip_spikes(optax.sgd(1.0), window=8, min_history=4, use_loss=True)
    g = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the loss.*loss=loss"):
        tx.update(g, tx.init(g), g)
    with pytest.raises(ValueError, match="scalar"):
        tx.update(g, tx.init(g), g, loss=jnp.ones(3))


def test_decision_is_global_across_devices_with_axis_name():
    # Two simulated devices (vmap with an axis name) each hold half of the gradient;
    # only device 1's half is NaN.
    halves = {"w": jnp.array([[0.1, 0.2], [jnp.nan, 0.3]])}
    params = {"w": jnp.zeros((2, 2))}
    for axis_name, expect_device0_skipped in [("d", True), (None, False)]:
        tx = optaxclip.skip_nonfinite(optax.adam(1e-2), axis_name=axis_name)
        state = jax.vmap(tx.init)(params)

        def step(g, s, p, tx=tx):
            return tx.update(g, s, p)

        u, new = jax.jit(jax.vmap(step, axis_name="d"))(halves, state, params)
        skipped = np.asarray(new.stats.clipped)
        assert skipped[1] and skipped[0] == expect_device0_skipped, axis_name
        counts = np.asarray(new.inner_state[0].count)
        np.testing.assert_array_equal(counts, [0 if expect_device0_skipped else 1, 0])


def test_vmap_with_a_batched_decision_keeps_each_state_bitwise():
    tx = optaxclip.skip_nonfinite(optax.adam(1e-2))
    batch = {"w": jnp.array([[0.1, 0.2, 0.3], [0.1, jnp.inf, 0.3]])}
    state = jax.vmap(tx.init)({"w": jnp.zeros((2, 3))})
    u, new = jax.jit(jax.vmap(lambda g, s: tx.update(g, s)))(batch, state)
    np.testing.assert_array_equal(u["w"][1], np.zeros(3))
    assert _leaves_equal(
        jax.tree.map(lambda x: x[1], new.inner_state),
        jax.tree.map(lambda x: x[1], state.inner_state),
    )
    assert int(new.inner_state[0].count[0]) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda inner: optaxclip.skip_nonfinite(inner),
        lambda inner: optaxclip.skip_spikes(inner, window=4, min_history=2),
    ],
    ids=["skip_nonfinite", "skip_spikes"],
)
def test_none_leaves_empty_trees_and_dtypes_pass_through(make):
    tx = make(optax.sgd(1.0))
    update = jax.jit(tx.update)
    g = {"a": None, "b": jnp.array([1.0, 2.0], jnp.bfloat16)}
    u, _ = update(g, tx.init(g))
    assert u["a"] is None and u["b"].dtype == jnp.bfloat16
    bad = {"a": None, "b": jnp.array([1.0, jnp.nan], jnp.bfloat16)}
    u, _ = update(bad, tx.init(bad))
    assert u["a"] is None and u["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(u["b"], np.float32), [0.0, 0.0])
    u, state = update({}, tx.init({}))
    assert u == {} and int(state.stats.count) == 1 and not bool(state.stats.clipped)


def test_stats_names_both_the_wrapper_and_a_clip_inside_it():
    tx = optaxclip.skip_spikes(
        optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1)), window=4, min_history=2
    )
    g = {"w": jnp.array([3.0, 4.0])}
    s = jax.jit(lambda g: optaxclip.stats(tx.update(g, tx.init(g), g)[1]))(g)
    assert float(s["skip_spikes/norm"]) == pytest.approx(5.0)
    assert float(s["skip_spikes/0/clip_by_global_norm/clipped_norm"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": -3}, ValueError, "window"),
        ({"window": 8.0}, TypeError, "window"),
        ({"window": True}, TypeError, "window"),
        ({"window": jnp.array(8)}, TypeError, "static_args"),
        ({"min_history": 0}, ValueError, "min_history"),
        ({"window": 8, "min_history": 9}, ValueError, r"min_history.*\[1, window\]"),
        ({"num_sigmas": 0.0}, ValueError, "num_sigmas"),
        ({"num_sigmas": -1.0}, ValueError, "num_sigmas"),
        ({"num_sigmas": float("nan")}, ValueError, "num_sigmas"),
        ({"use_loss": "yes"}, TypeError, "use_loss"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"max_consecutive_skips": 2.5}, TypeError, "max_consecutive_skips"),
    ],
)
def test_invalid_arguments_are_rejected_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.skip_spikes(optax.sgd(1.0), **kwargs)


def test_integer_leaves_are_rejected_naming_the_leaf():
    for tx in (optaxclip.skip_nonfinite(optax.sgd(1.0)), optaxclip.skip_spikes(optax.sgd(1.0))):
        g = {"steps": jnp.ones(2, jnp.int32)}
        with pytest.raises(TypeError, match=r"\['steps'\]"):
            tx.update(g, tx.init(g))


@pytest.mark.parametrize("make", [optaxclip.skip_nonfinite, optaxclip.skip_spikes])
def test_wrappers_reject_something_that_is_not_an_optimizer(make):
    with pytest.raises(TypeError, match="GradientTransformation"):
        make(None)


def _nan_or_one(pattern):
    return [{"w": jnp.full(3, jnp.nan if bad else 1.0)} for bad in pattern]


@pytest.mark.parametrize("make", [optaxclip.skip_nonfinite, optaxclip.skip_spikes])
def test_consecutive_skips_count_the_current_run_and_reset_on_a_taken_step(make):
    tx = make(optax.sgd(0.1))
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    runs = []
    for g in _nan_or_one([0, 1, 1, 1, 0, 1, 0, 0]):
        _, state = update(g, state, PARAMS)
        runs.append(int(optaxclip.stats(state)["consecutive_skips"]))
        assert int(state.consecutive_skips) == runs[-1]
    assert runs == [0, 1, 2, 3, 0, 1, 0, 0]


@pytest.mark.parametrize("make", [optaxclip.skip_nonfinite, optaxclip.skip_spikes])
def test_max_consecutive_skips_raises_naming_the_step_and_the_count(make):
    # 1,000 NaN steps in a row no longer pass in silence: the 4th skip in a row raises.
    tx = make(optax.sgd(0.1), max_consecutive_skips=3)
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for g in _nan_or_one([1, 1, 0, 1, 1, 1]):  # a taken step resets the run
        _, state = update(g, state, PARAMS)
    assert int(state.consecutive_skips) == 3
    stalled = r"step 7 \(count from 1\) makes 4 skipped steps in a row.*=3"
    with pytest.raises(Exception, match=stalled):
        for g in _nan_or_one([1] * 1000):
            _, state = update(g, state, PARAMS)
            jax.block_until_ready(state)


def test_max_consecutive_skips_counts_spikes_too():
    tx = optaxclip.skip_spikes(
        optax.sgd(0.1), window=4, min_history=4, num_sigmas=3.0, max_consecutive_skips=1
    )
    state, update = tx.init(PARAMS), jax.jit(tx.update)
    for scale in [1.0, 1.1, 0.9, 1.0, 50.0]:  # one spike: a run of 1 is allowed
        _, state = update({"w": jnp.full(3, scale)}, state, PARAMS)
    assert bool(state.stats.clipped)
    with pytest.raises(Exception, match="step 6 .* makes 2 skipped steps in a row"):
        _, state = update({"w": jnp.full(3, jnp.nan)}, state, PARAMS)
        jax.block_until_ready(state)


def test_skip_spikes_warns_once_when_handed_a_loss_it_does_not_watch():
    tx = optaxclip.skip_spikes(optax.sgd(1.0))
    g = {"w": jnp.ones(2)}
    state = tx.init(g)
    with pytest.warns(UserWarning, match="use_loss=True"):
        tx.update(g, state, g, loss=jnp.float32(1.0))


def _noisy_norms(n, seed=0):
    return 1.0 + 0.05 * np.random.default_rng(seed).standard_normal(n)


def test_a_skipped_spike_does_not_blind_the_detector_to_the_next_one():
    # Bad batches cluster: a 10x spike, then a 5x one 20 steps later. The references
    # let the 10x value into the window, which lifts the threshold above 5x.
    norms = _noisy_norms(200)
    norms[100] *= 10.0
    norms[120] *= 5.0
    kw = dict(window=64, num_sigmas=6.0, min_history=32)
    _, (_, skipped, _, _) = _run_spikes(norms, norms, False, **kw)
    assert skipped[100] and skipped[120]
    assert skipped.sum() == 2
    _, (_, skipped_ref, _, _) = _run_spikes(norms, norms, False, count_skipped=True, **kw)
    assert skipped_ref[100] and not skipped_ref[120]  # the references' rule is reachable


@pytest.mark.parametrize("count_skipped", [False, True])
def test_a_lasting_level_shift_becomes_the_baseline_within_the_window(count_skipped):
    window = 32
    norms = _noisy_norms(300)
    norms[150:] *= 10.0
    kw = dict(window=window, num_sigmas=6.0, min_history=16, count_skipped=count_skipped)
    _, (_, skipped, _, _) = _run_spikes(norms, norms, False, **kw)
    assert skipped[150]  # the shift looks like a spike at first
    assert not skipped[150 + window :].any()  # never skipped forever
    assert skipped[150:].sum() <= window // 2 + 1


def test_spike_decisions_are_the_same_for_norms_near_the_float32_maximum():
    # The history's mean and deviation are taken over norm / largest norm; XLA divides
    # by a broadcast scalar through its reciprocal, which flushed to zero for 1e38: the
    # mean read 0 and every step was skipped.
    norms = _noisy_norms(120)
    norms[90] *= 2.5  # 30 standard deviations
    kw = dict(window=32, num_sigmas=6.0, min_history=16)
    _, (_, skipped, threshold, _) = _run_spikes(norms, norms, False, **kw)
    _, (_, skipped_big, threshold_big, _) = _run_spikes(norms * 1e38, norms, False, **kw)
    assert skipped[90] and skipped.sum() == 1
    np.testing.assert_array_equal(skipped_big, skipped)
    np.testing.assert_allclose(threshold_big[16:], threshold[16:] * 1e38, rtol=1e-5)


@pytest.mark.parametrize("run", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_history_mean_and_deviation_of_norms_near_the_float32_maximum(run):
    # The helper behind skip_spikes' threshold and ZClip's warm-up statistics. Called on
    # its own (eagerly or jitted), its 1 / 2e38 flushed and both statistics read 0.
    from optaxclip._mechanics import masked_mean_std

    values = np.array([1e38, 2e38, 1.5e38, 3e38])
    mask = np.array([True, True, True, False])
    mean, std = run(masked_mean_std)(jnp.asarray(values, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(mean), values[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(std), values[mask].std(), rtol=1e-5)
