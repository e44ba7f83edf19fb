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
                    clip_factor, eps):  # fmt: skip
    """ZClip as in the reference implementation (bluorion-com/ZClip), in float64.

    Returns per step (threshold, scale, clipped, spike) and the final (mean, var).
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
            for field in ("buffer", "mean", "var"):
                np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
            assert int(after.stats.nonfinite_count) == int(state.stats.nonfinite_count) + 1
        state = after
    # Warm-up took the 3 finite norms 1, 2, 3; the EMA then saw only 2.5.
    mean0, var0 = 2.0, 2.0 / 3.0
    mean = 0.97 * mean0 + 0.03 * 2.5
    var = 0.97 * var0 + 0.03 * (2.5 - mean) ** 2
    np.testing.assert_allclose([state.mean, state.var], [mean, var], rtol=1e-6)
    assert int(state.stats.count) == len(steps)


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
