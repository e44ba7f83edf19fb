"""ZClip: z-score spike clipping, checked step by step against the reference algorithm."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import DIRECTION, jit_steps, norms64, run_scan, scaled, scan_steps

import optaxclip


def spiky_norms(steps: int, seed: int) -> np.ndarray:
    """Norms drifting from ~1 to ~2 with 3x-30x spikes and NaN/inf steps (some in warm-up)."""
    rng = np.random.default_rng(seed)
    norms = rng.lognormal(0.0, 0.2, steps) * np.linspace(1.0, 2.0, steps)
    spikes = rng.choice(np.arange(30, steps), steps // 15, replace=False)
    norms[spikes] *= rng.uniform(3, 30, spikes.size)
    norms[[2, steps // 3, steps // 3 + 1, steps // 2]] = np.nan
    norms[[7, 3 * steps // 4]] = np.inf
    return norms.astype(np.float32)


def zclip_reference(norms, *, alpha, z_thresh, max_norm, warmup_steps, mode, clip_option,
                    clip_factor, eps, skip_update_on_spike=False):  # fmt: skip
    """ZClip as in the reference implementation (bluorion-com/ZClip), in float64.

    Returns per step (threshold, scale, clipped, spike) and the final (mean, var).
    With ``skip_update_on_spike`` a spike is clipped all the same but leaves the mean
    and var as they were (the reference's ``step`` returns before ``_update_ema``).
    A norm of exactly zero is not taken in (DESIGN: it says nothing about scale): it is
    not buffered, does not move the EMA and passes with threshold ``max_norm``.
    """
    cap = math.inf if max_norm is None else max_norm
    size = max(warmup_steps, 1)
    buffer, mean, var = [], None, None
    rows = []
    for g in norms.astype(np.float64):
        spike = False
        if not math.isfinite(g):
            rows.append((cap, 1.0, False, False))
            continue
        if g == 0:
            rows.append((cap, 1.0, False, False))
            continue
        if mean is None:  # warm-up: clip at max_norm, buffer the raw norm
            buffer.append(g)
            if len(buffer) == size:
                mean = sum(buffer) / size
                var = sum((x - mean) ** 2 for x in buffer) / size
            t = cap
        else:
            std = math.sqrt(var)
            tau = None
            if mode == "percentile":
                if g > mean + z_thresh * std:
                    tau = mean + z_thresh * std
            else:
                z = (g - mean) / (std + eps)
                if z > z_thresh:
                    if clip_option == "adaptive_scaling":
                        tau = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
                    else:
                        tau = mean
            spike = tau is not None
            x = tau if spike else g
            t = min(x, cap)
            if not (spike and skip_update_on_spike):
                mean = alpha * mean + (1 - alpha) * x
                var = alpha * var + (1 - alpha) * (x - mean) ** 2
        over = g > t
        rows.append((t, t / g if over else 1.0, over, spike))
    t, scale, clipped, spikes = (np.array(c) for c in zip(*rows, strict=True))
    return t, scale, clipped, spikes, (mean, var)


CONFIGS = [
    dict(mode="zscore", clip_option="adaptive_scaling", max_norm=None),
    dict(mode="zscore", clip_option="adaptive_scaling", max_norm=2.5, clip_factor=0.8,
         alpha=0.9, z_thresh=2.0, warmup_steps=10),
    dict(mode="zscore", clip_option="mean", max_norm=None, warmup_steps=10),
    dict(mode="zscore", clip_option="mean", max_norm=1.8),
    dict(mode="percentile", max_norm=None, z_thresh=3.0),
    dict(mode="percentile", max_norm=2.5, warmup_steps=5, eps=1e-3),
    # skip_update_on_spike: a spike is clipped as above but leaves the EMA unmoved.
    dict(mode="zscore", clip_option="adaptive_scaling", max_norm=None, skip_update_on_spike=True),
    dict(mode="zscore", clip_option="adaptive_scaling", max_norm=2.5, clip_factor=0.8,
         alpha=0.9, z_thresh=2.0, warmup_steps=10, skip_update_on_spike=True),
    dict(mode="zscore", clip_option="mean", max_norm=1.8, skip_update_on_spike=True),
    dict(mode="percentile", max_norm=2.5, warmup_steps=5, eps=1e-3, skip_update_on_spike=True),
]  # fmt: skip
DEFAULTS = dict(
    alpha=0.97,
    z_thresh=2.5,
    warmup_steps=25,
    mode="zscore",
    clip_option="adaptive_scaling",
    clip_factor=1.0,
    eps=1e-6,
    max_norm=1.0,
    skip_update_on_spike=False,
)


NORMS = spiky_norms(320, seed=1)


@functools.cache
def acceptance_runs():
    """Every configuration over NORMS, compiled as one program (one compile, not six)."""
    txs = [optaxclip.zclip(**{**DEFAULTS, **config}) for config in CONFIGS]
    runs = jax.jit(lambda xs: [scan_steps(tx, xs) for tx in txs])(NORMS)
    return [(final, [np.asarray(x) for x in per_step]) for final, per_step in runs]


@pytest.mark.parametrize(
    "index", range(len(CONFIGS)), ids=lambda i: "-".join(map(str, CONFIGS[i].values()))
)
def test_matches_reference_algorithm_every_step(index):
    kwargs = {**DEFAULTS, **CONFIGS[index]}
    norms = NORMS
    final, (measured, out_norm, threshold, clipped) = acceptance_runs()[index]
    finite = np.isfinite(norms)
    np.testing.assert_allclose(measured[finite], norms[finite], rtol=1e-6)
    ref_t, ref_scale, ref_clipped, ref_spike, (mean, var) = zclip_reference(measured, **kwargs)
    np.testing.assert_allclose(threshold, ref_t, rtol=1e-5)
    np.testing.assert_allclose(out_norm[finite] / measured[finite], ref_scale[finite], rtol=1e-5)
    np.testing.assert_array_equal(clipped, ref_clipped)
    np.testing.assert_allclose([final.mean, final.var], [mean, var], rtol=1e-5)
    # NaN/inf steps come out as they went in (propagate).
    assert np.all(~np.isfinite(out_norm[~finite]))
    # The sequence exercises spikes, clips and calm steps.
    assert ref_spike.sum() >= 5 and 0 < ref_clipped.sum() < finite.sum()
    if kwargs["skip_update_on_spike"]:  # the option changes the statistics
        _, _, _, _, (mean_off, _) = zclip_reference(
            measured, **{**kwargs, "skip_update_on_spike": False}
        )
        assert abs(mean - mean_off) > 1e-3 * mean


def test_ema_is_fed_the_uncapped_value_like_the_reference():
    # Every norm is 4 and max_norm is 1: each step clips at 1, but the statistics
    # describe the gradients (mean 4), not the cap.
    tx = optaxclip.zclip(max_norm=1.0, warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for _ in range(5):
        out, state = update([jnp.array([4.0])], state)
        np.testing.assert_allclose(out[0], [1.0], rtol=1e-6)
    assert float(state.mean) == 4.0 and float(state.var) == 0.0
    assert float(state.stats.threshold) == 1.0


def test_jitted_update_compiles_once_and_follows_the_rule():
    norms = spiky_norms(50, seed=2)
    kwargs = {**DEFAULTS, "warmup_steps": 5, "max_norm": 3.0}
    tx = optaxclip.zclip(**kwargs)
    traces, thresholds, measured = jit_steps(tx, norms)
    assert traces == 1  # the state is type-stable: no retrace on step 2
    want = zclip_reference(np.array(measured), **kwargs)[0]
    np.testing.assert_allclose(thresholds, want, rtol=1e-5)


def test_inject_hyperparams_matches_direct_and_can_be_changed():
    norms = spiky_norms(60, seed=3)
    kwargs = dict(alpha=0.9, z_thresh=2.0, max_norm=3.0, warmup_steps=5, clip_factor=0.9)
    injected = optax.inject_hyperparams(optaxclip.zclip, static_args=("warmup_steps",))(**kwargs)
    state, (measured, _, got, _) = run_scan(injected, norms)
    assert set(state.hyperparams) == {"alpha", "z_thresh", "max_norm", "clip_factor", "eps"}
    want = zclip_reference(measured, **{**DEFAULTS, **kwargs})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # A z-score threshold no norm reaches and no cap: nothing is clipped.
    hyperparams = {**state.hyperparams, "z_thresh": 1e9, "max_norm": jnp.inf}
    state = state._replace(hyperparams=jax.tree.map(jnp.float32, hyperparams))
    out, state = jax.jit(injected.update)(scaled(100.0), state, DIRECTION)
    assert not state.inner_state.stats.clipped
    np.testing.assert_allclose(np.linalg.norm(norms64(out)), 100.0, rtol=1e-6)


def test_bf16_in_bf16_out_and_complex_leaves():
    tx = optaxclip.zclip(max_norm=1.0, warmup_steps=3)
    grads = {"h": jnp.full((9,), 1.0, jnp.bfloat16), "z": jnp.array([3 + 4j], jnp.complex64)}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["h"].dtype == jnp.bfloat16 and out["z"].dtype == jnp.complex64
    norm = math.sqrt(9 + 25)
    np.testing.assert_allclose(float(state.stats.norm), norm, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["z"]), [(3 + 4j) / norm], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["h"], np.float32), 1 / norm, rtol=1e-2)


def test_none_leaves_and_empty_tree_pass_through():
    tx = optaxclip.zclip()
    grads = {"a": jnp.array([3.0, 4.0]), "b": None}
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["b"] is None
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    out, state = jax.jit(tx.update)({}, tx.init({}))
    assert out == {} and int(state.stats.count) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"z_thresh": 0.0}, "z_thresh"),
        ({"z_thresh": -1.0}, "z_thresh"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"mode": "zscores"}, "mode"),
        ({"clip_option": "median"}, "clip_option"),
        ({"clip_factor": -0.5}, "clip_factor"),
        ({"eps": -1e-6}, "eps"),
        ({"nonfinite": "skip"}, "nonfinite"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optaxclip.zclip(**kwargs)


def test_nonfinite_steps_leave_buffer_and_ema_untouched_and_do_not_count_as_warmup():
    tx = optaxclip.zclip(warmup_steps=3, max_norm=None, nonfinite="zero")
    update = jax.jit(tx.update)
    state = tx.init(None)
    steps = [1.0, jnp.nan, 2.0, jnp.inf, 3.0, -jnp.inf, 2.5, jnp.nan]
    for g in steps:
        out, after = update([jnp.array([g])], state)
        if not math.isfinite(g):
            np.testing.assert_array_equal(out[0], [0.0])
            for field in set(after._fields) - {"stats"}:  # buffer, mean, var, recorded
                np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
            assert int(after.stats.nonfinite_count) == int(state.stats.nonfinite_count) + 1
        state = after
    # Warm-up took the 3 finite norms 1, 2, 3; the EMA then saw only 2.5.
    mean0, var0 = 2.0, 2.0 / 3.0
    mean = 0.97 * mean0 + 0.03 * 2.5
    var = 0.97 * var0 + 0.03 * (2.5 - mean) ** 2
    np.testing.assert_allclose([state.mean, state.var], [mean, var], rtol=1e-6)
    assert int(state.stats.count) == len(steps)


# The transient of a huge norm decays over thousands of steps: compared with the float64
# reference at alpha = 0.97, float32(0.97) (2.9e-8 larger) drifts 1e-4 by then. Both
# sides use the alpha float32 can hold.
ALPHA32 = float(np.float32(0.97))


def _scan_with_ema(tx, norms):
    """Feeds DIRECTION * norms[t]; per step: norm, output norm, threshold, mean, var."""

    def step(state, s):
        out, state = tx.update(scaled(s), state)
        st = state.stats
        return state, (st.norm, optaxclip.global_norm(out), st.threshold, state.mean, state.var)

    final, per_step = jax.jit(lambda xs: jax.lax.scan(step, tx.init(DIRECTION), xs))(norms)
    return final, [np.asarray(x) for x in per_step]


def test_warmup_norm_of_1e20_keeps_the_variance_finite_and_later_spikes_are_clipped():
    # One warm-up norm of 1e20 among 24 norms ~1: its float32 square overflows, and so
    # does the variance itself (3.84e38 in float64). An inf variance would disable the
    # spike test for good; it is held at the largest float32 instead.
    rng = np.random.default_rng(7)
    norms = rng.lognormal(0.0, 0.2, 4500).astype(np.float32)
    norms[10] = 1e20
    norms[4490] = 1000.0
    kwargs = {**DEFAULTS, "max_norm": None, "alpha": ALPHA32}
    final, (measured, out_norm, threshold, mean, var) = _scan_with_ema(
        optaxclip.zclip(**kwargs), norms
    )
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
    np.testing.assert_allclose(measured, norms, rtol=1e-6)
    warm = measured[:25].astype(np.float64)
    assert warm.var() > np.finfo(np.float32).max
    np.testing.assert_allclose(mean[24], warm.mean(), rtol=1e-6)
    assert var[24] == np.finfo(np.float32).max
    # The EMA forgets its start at alpha**t: a few thousand steps later the thresholds
    # are the reference's again, and the 1000x spike is clipped.
    ref_t, _, ref_clipped, _, (ref_mean, ref_var) = zclip_reference(measured, **kwargs)
    np.testing.assert_allclose(threshold[-500:], ref_t[-500:], rtol=1e-5)
    np.testing.assert_allclose([final.mean, final.var], [ref_mean, ref_var], rtol=1e-5)
    assert ref_clipped[4490] and out_norm[4490] < 10  # pulled back to ~1


def test_norm_whose_square_overflows_matches_the_reference_every_step():
    # A warm-up norm of 2e19: its float32 square (4e38) overflows but the variance
    # (1.5e37) fits, so every step equals the float64 reference.
    rng = np.random.default_rng(8)
    norms = rng.lognormal(0.0, 0.2, 3000).astype(np.float32)
    norms[3] = 2e19
    norms[2990] = 1000.0
    kwargs = {**DEFAULTS, "max_norm": None, "alpha": ALPHA32}
    final, (measured, out_norm, threshold, mean, var) = _scan_with_ema(
        optaxclip.zclip(**kwargs), norms
    )
    warm = measured[:25].astype(np.float64)
    np.testing.assert_allclose([mean[24], var[24]], [warm.mean(), warm.var()], rtol=1e-5)
    ref_t, ref_scale, ref_clipped, _, (ref_mean, ref_var) = zclip_reference(measured, **kwargs)
    np.testing.assert_allclose(threshold, ref_t, rtol=1e-5)
    np.testing.assert_allclose(out_norm / measured, ref_scale, rtol=1e-5)
    np.testing.assert_allclose([final.mean, final.var], [ref_mean, ref_var], rtol=1e-5)
    assert ref_clipped[2990] and out_norm[2990] < 10


def test_ema_stays_finite_for_norms_up_to_the_float32_maximum():
    big = float(np.finfo(np.float32).max)
    norms = [big, 1.0, big, big, big, 1.0, 0.5 * big, big, 2.0, big, 0.0, big]
    tx = optaxclip.zclip(warmup_steps=3, max_norm=None)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for t, g in enumerate(norms):
        _, state = update([jnp.array([g], jnp.float32)], state)
        assert float(state.stats.norm) == np.float32(g)
        mean, var = float(state.mean), float(state.var)
        assert math.isfinite(mean) and math.isfinite(var), (t, mean, var)
        if t >= 2:  # the EMA averages the norms it was fed: it stays within their range
            assert 0 < mean <= big and 0 <= var <= big
    np.testing.assert_allclose(state.buffer, [big, 1.0, big])


def test_zero_gradient_warmup_does_not_lock_the_threshold_at_zero():
    # A frozen start (every gradient exactly zero) must not make a warm-up of zeros,
    # whose mean and variance 0 would zero every later update.
    kwargs = {**DEFAULTS, "warmup_steps": 3, "max_norm": None}
    tx = optaxclip.zclip(**kwargs)
    update = jax.jit(tx.update)
    init = state = tx.init(None)
    norms = np.array([0.0] * 10 + [1.0, 0.0, 1.2, 0.8, 1.0, 0.0, 1.1, 9.0, 0.0, 1.0], np.float32)
    thresholds, scales = [], []
    for g in norms:
        out, after = update([jnp.array([g])], state)
        thresholds.append(float(after.stats.threshold))
        scales.append(float(out[0][0]) / g if g else 1.0)
        if g == 0:  # not buffered, not counted as a warm-up step, the EMA unmoved
            np.testing.assert_array_equal(out[0], [0.0])
            assert not after.stats.clipped
            for field in set(after._fields) - {"stats"}:  # buffer, mean, var, recorded
                np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
        state = after
    for field in ("buffer", "recorded"):
        assert not np.array_equal(getattr(state, field), getattr(init, field))
    assert int(state.recorded) == 7  # the non-zero norms
    ref_t, ref_scale, _, ref_spike, (mean, var) = zclip_reference(norms, **kwargs)
    np.testing.assert_allclose(thresholds, ref_t, rtol=1e-5)
    np.testing.assert_allclose(scales, ref_scale, rtol=1e-5)
    np.testing.assert_allclose([state.mean, state.var], [mean, var], rtol=1e-5)
    np.testing.assert_allclose(state.buffer, [1.0, 1.2, 0.8], rtol=1e-6)
    assert ref_spike.sum() == 1 and scales[10] == 1.0  # only the 9.0 is a spike


def test_gradient_is_finite_when_sigma_and_eps_are_zero():
    # eps=0 and a constant warm-up (sigma = 0): the z-score divides by zero. Gradients
    # of a function of the output must still be finite, and right, on both sides.
    tx = optaxclip.zclip(warmup_steps=2, eps=0.0, max_norm=None)
    w = jnp.array([1.0, 2.0])
    grad = jax.jit(jax.grad(lambda g, state: jnp.sum(tx.update([g], state)[0][0] * w)))
    state = tx.init(None)
    np.testing.assert_allclose(grad(jnp.array([3.0, 4.0]), state), w)  # warm-up: identity
    for _ in range(2):
        _, state = tx.update([jnp.array([3.0, 4.0])], state)
    for g in ([3.0, 4.0], [0.3, 0.4], [0.0, 0.0]):  # at and below the mean: no spike
        np.testing.assert_allclose(grad(jnp.array(g), state), w)
    # A spike (z = +inf) is clipped at tau = mu = 5, a constant: out = 5 g / |g|.
    g = np.array([30.0, 40.0])
    n = np.linalg.norm(g)
    want = 5 / n * (np.asarray(w) - (np.asarray(w) @ g) * g / n**2)
    np.testing.assert_allclose(grad(jnp.asarray(g, jnp.float32), state), want, rtol=1e-5)


def test_warmup_zero_starts_from_the_first_norm_like_the_reference():
    tx = optaxclip.zclip(warmup_steps=0, max_norm=None)
    update = jax.jit(tx.update)
    _, state = update([jnp.array([2.0])], tx.init(None))
    assert float(state.mean) == 2.0 and float(state.var) == 0.0
    assert float(state.stats.threshold) == math.inf  # first step: warm-up, no cap
    _, state = update([jnp.array([8.0])], state)  # z = 6 / eps: a spike
    np.testing.assert_allclose(state.stats.threshold, 2.0, rtol=1e-5)


def test_nonfinite_error_policy_raises_naming_the_step():
    tx = optaxclip.zclip(nonfinite="error")
    update = jax.jit(tx.update)
    _, state = update([jnp.array([1.0])], tx.init(None))
    with pytest.raises(Exception, match="step 2"):
        jax.block_until_ready(update([jnp.array([jnp.inf])], state))


def test_stats_names_zclip_in_a_chain():
    tx = optax.chain(optaxclip.zclip(), optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    _, state = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    s = optaxclip.stats(state)
    assert float(s["0/zclip/norm"]) == 5.0 and float(s["0/zclip/threshold"]) == 1.0


def test_max_norm_schedule_is_read_at_the_step_count():
    schedule = optax.linear_schedule(1.0, 3.0, transition_steps=2)
    tx = optaxclip.zclip(max_norm=schedule, warmup_steps=5)
    update = jax.jit(tx.update)
    state = tx.init(None)
    thresholds = []
    for _ in range(3):
        _, state = update([jnp.array([10.0])], state)
        thresholds.append(float(state.stats.threshold))
    assert thresholds == [1.0, 2.0, 3.0]


# skip_update_on_spike: as in the reference implementation, a spike step is clipped as
# usual and leaves the EMA statistics as they were (it skips no optimizer update).


def test_skip_update_on_spike_freezes_the_ema_and_still_clips():
    # The reference's own test_skip_update_on_spike: mean 1, var 0.25 (std 0.5),
    # z_thresh 2 and a norm of 3 (z ~ 4): a spike. With the option the mean stays 1;
    # either way the update is clipped at tau = 1 + 2 * 0.5 / (z / 2) ~ 1.5.
    z = 2.0 / (0.5 + 1e-6)
    tau = 1.0 + 2.0 * 0.5 / (z / 2.0)
    for skip in (True, False):
        tx = optaxclip.zclip(z_thresh=2.0, max_norm=None, warmup_steps=1, skip_update_on_spike=skip)
        state = tx.init(None)._replace(
            mean=jnp.float32(1.0), var=jnp.float32(0.25), recorded=jnp.int32(1)
        )
        out, after = jax.jit(tx.update)([jnp.array([3.0])], state)
        np.testing.assert_allclose(out[0], [tau], rtol=1e-6)
        assert bool(after.stats.clipped)
        np.testing.assert_allclose(
            [after.stats.threshold, after.stats.clipped_norm], [tau, tau], rtol=1e-6
        )
        if skip:
            assert float(after.mean) == 1.0 and float(after.var) == 0.25
        else:
            mean = 0.97 + 0.03 * tau
            var = 0.97 * 0.25 + 0.03 * (tau - mean) ** 2
            np.testing.assert_allclose([after.mean, after.var], [mean, var], rtol=1e-6)


def test_skip_update_on_spike_leaves_the_ema_unmoved_on_every_spike_step():
    kwargs = {**DEFAULTS, "max_norm": 2.5, "warmup_steps": 10, "skip_update_on_spike": True}
    tx = optaxclip.zclip(**kwargs, nonfinite="zero")
    final, (measured, out_norm, threshold, mean, var) = _scan_with_ema(tx, NORMS)
    finite = np.isfinite(NORMS)
    ref_t, ref_scale, ref_clipped, ref_spike, (ref_mean, ref_var) = zclip_reference(
        measured, **kwargs
    )
    np.testing.assert_allclose(threshold, ref_t, rtol=1e-5)
    np.testing.assert_allclose(out_norm[finite] / measured[finite], ref_scale[finite], rtol=1e-5)
    np.testing.assert_allclose([final.mean, final.var], [ref_mean, ref_var], rtol=1e-5)
    # Spike steps (and NaN/inf steps) keep the statistics bit for bit; calm steps after
    # the warm-up move them.
    frozen = (ref_spike | ~finite)[1:]
    assert ref_spike.sum() >= 5
    np.testing.assert_array_equal(mean[1:][frozen], mean[:-1][frozen])
    np.testing.assert_array_equal(var[1:][frozen], var[:-1][frozen])
    calm = ~frozen & (np.arange(1, len(NORMS)) >= 12)  # past the 10 finite warm-up norms
    assert np.all(mean[1:][calm] != mean[:-1][calm])
    # Non-finite steps still follow the nonfinite policy: zeros.
    np.testing.assert_array_equal(out_norm[~finite], 0.0)
    assert np.all(ref_clipped[ref_spike])


@pytest.mark.parametrize("value", [1, 0, 1.0, "yes", None])
def test_skip_update_on_spike_must_be_a_bool(value):
    with pytest.raises(TypeError, match="skip_update_on_spike"):
        optaxclip.zclip(skip_update_on_spike=value)


@pytest.mark.parametrize("value", [jnp.array(True), np.array(False)])
def test_skip_update_on_spike_as_an_array_says_to_use_static_args(value):
    with pytest.raises(TypeError, match=r"skip_update_on_spike.*static_args"):
        optaxclip.zclip(skip_update_on_spike=value)
    # inject_hyperparams turns an array into a hyperparameter: init says what to do.
    injected = optax.inject_hyperparams(optaxclip.zclip, static_args=("warmup_steps",))
    with pytest.raises(TypeError, match=r"skip_update_on_spike.*static_args"):
        injected(skip_update_on_spike=value).init(DIRECTION)


def test_skip_update_on_spike_numpy_bool_is_accepted():
    tx = optaxclip.zclip(skip_update_on_spike=np.True_, warmup_steps=2)
    _, state = jax.jit(tx.update)([jnp.array([1.0])], tx.init(None))
    assert int(state.recorded) == 1


@pytest.mark.parametrize(
    "static", [("warmup_steps",), ("warmup_steps", "skip_update_on_spike")], ids=["bool", "static"]
)
def test_skip_update_on_spike_under_inject_hyperparams(static):
    # optax.inject_hyperparams keeps a Python bool as it is (never an array), listed in
    # static_args or not.
    norms = spiky_norms(80, seed=4)
    kwargs = dict(alpha=0.9, z_thresh=2.0, max_norm=None, warmup_steps=5)
    injected = optax.inject_hyperparams(optaxclip.zclip, static_args=static)(
        **kwargs, skip_update_on_spike=True
    )
    state, (measured, out_norm, got, clipped) = run_scan(injected, norms)
    assert "skip_update_on_spike" not in state.hyperparams
    full = {**DEFAULTS, **kwargs, "skip_update_on_spike": True}
    ref_t, _, ref_clipped, ref_spike, (mean, var) = zclip_reference(measured, **full)
    np.testing.assert_allclose(got, ref_t, rtol=1e-5)
    np.testing.assert_array_equal(clipped, ref_clipped)
    inner = state.inner_state
    np.testing.assert_allclose([inner.mean, inner.var], [mean, var], rtol=1e-5)
    assert ref_spike.sum() >= 2
    off = zclip_reference(measured, **{**full, "skip_update_on_spike": False})[-1]
    assert abs(off[0] - mean) > 1e-3 * mean


def test_skip_update_on_spike_jitted_compiles_once():
    norms = spiky_norms(50, seed=2)
    kwargs = {**DEFAULTS, "warmup_steps": 5, "max_norm": 3.0, "skip_update_on_spike": True}
    traces, thresholds, measured = jit_steps(optaxclip.zclip(**kwargs), norms)
    assert traces == 1
    want = zclip_reference(np.array(measured), **kwargs)[0]
    np.testing.assert_allclose(thresholds, want, rtol=1e-5)


def test_gradient_through_the_state_across_steps_is_finite_and_right():
    # Differentiating through two steps (unrolled or meta-gradients) reads the EMA's
    # derivative at var = 0, where a plain sqrt gives NaN.
    tx = optaxclip.zclip(warmup_steps=2, max_norm=None)

    def f(a):
        state = tx.init(None)
        _, state = tx.update([jnp.array([a, a])], state)
        out, state = tx.update([jnp.array([a, 2 * a])], state)
        out, _ = tx.update([jnp.array([3 * a, a])], state)
        return jnp.sum(out[0])

    grad = float(jax.grad(f)(1.0))
    h = 1e-2
    numeric = (float(f(1.0 + h)) - float(f(1.0 - h))) / (2 * h)
    assert np.isfinite(grad)
    assert grad == pytest.approx(numeric, rel=1e-2)
