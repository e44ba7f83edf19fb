"""spike_aware_clip (SPAM): checked step by step against the reference rule in float64.

The reference is ``TianjinYellow/SPAM-Optimizer``'s ``galore_torch/SPAM.py``, whose clip
(inside its Adam step, with ``DeltaT=0``: no momentum reset) reads, per parameter::

    current_step = total_step + 1                      # counts from 1
    if thres != 0 and current_step >= grad_accu_steps:
        mask = grad**2 > thres * exp_avg_sq            # v before this step's update
        grad[mask] = grad[mask].sign() * sqrt(exp_avg_sq[mask] * thres)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad   # the clipped grad

:func:`spam64` writes that out in float64 NumPy; nothing in it comes from optaxclip.

Every test runs three times: with the layout XLA:CPU gets, with the one the TPU compiler
gets (the norm first, then one read that clips, writes and measures; sums kept apart)
and with the GPU's (the same, over the norm engine's GPU layout, which has no rescue
branch), chosen here by making the transform read "tpu" or "gpu" as the platform it is
compiled for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import norm64, np64
from hypothesis import given
from hypothesis import strategies as st

import optaxclip
from optaxclip import _mechanics, _norm_engine, _spike_aware
from optaxclip._norm_engine import SMALL_LEAF


@pytest.fixture(scope="module", autouse=True, params=["cpu-layout", "tpu-layout", "gpu-layout"])
def layout(request):
    """The transform's layout for the target platform (DESIGN §9), each on this CPU."""
    platform = request.param.removesuffix("-layout")
    with pytest.MonkeyPatch.context() as patch:
        if platform != "cpu":
            for module in (_spike_aware, _mechanics, _norm_engine):
                patch.setattr(module, "target_platform", lambda leaves: platform)
        yield request.param


def test_each_layout_is_the_one_its_platform_gets(layout, monkeypatch):
    called = []

    def spy(name):
        real = getattr(_spike_aware, name)

        def measure(*args, **kwargs):
            called.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(_spike_aware, name, measure)

    spy("map_and_measure")
    spy("map_and_measure_mapped")
    g = {"w": jnp.ones((5000,))}
    tx = optaxclip.spike_aware_clip()
    text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
    # The TPU and GPU layouts measure the norm first with the norm engine (whose rescue
    # is the TPU's one conditional; the GPU's sums at three scales need none), then the
    # clipped values at three scales (no rescue branch); the CPU layout measures both in
    # one read, with map_and_measure's rescue.
    assert text.count("stablehlo.case") == (0 if layout == "gpu-layout" else 1)
    norm_first = layout in ("tpu-layout", "gpu-layout")
    assert called == (["map_and_measure_mapped"] if norm_first else ["map_and_measure"])


def test_on_gpu_the_ema_reads_the_returned_leaf_where_it_is_in_working_precision(
    layout, monkeypatch
):
    """On GPU a float32 leaf's EMA takes the returned (clipped) leaf, so the clip is
    traced once per leaf; XLA:GPU given the clip twice wrote each clipped leaf out and
    read it back at 100 leaves of 200,000. A bf16 leaf, returned rounded, and every
    leaf in the other layouts are clipped again for the EMA (XLA computes it once)."""
    calls = []
    real = _spike_aware._clip_coordinates

    def counted(x, *args):
        calls.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(_spike_aware, "_clip_coordinates", counted)
    g = {"f32": jnp.ones((5000,)), "bf16": jnp.ones((7,), jnp.bfloat16)}
    tx = optaxclip.spike_aware_clip()
    jax.jit(tx.update).lower(g, tx.init(g))
    traced = {str(d): calls.count(d) for d in set(calls)}
    # Each layout clips a leaf once for the update (the CPU layout once more in its
    # rescue branch); the EMA adds one, but for a float32 leaf on GPU.
    saved = 1 if layout == "gpu-layout" else 0
    assert traced["float32"] == traced["bfloat16"] - saved, traced


def spam64(grads, *, threshold, beta, grad_accu_steps, pass_zero_v=False):
    """The reference's clip over a sequence of gradient arrays, in float64.

    ``grads``: an array of shape (steps, ...); ``threshold`` a number or one per step.
    ``pass_zero_v`` adds optaxclip's one documented change to the rule: a coordinate
    whose ``v`` is exactly 0 is not clipped (the reference zeroes it, for good).
    Returns the clipped gradients, the clip mask and ``v`` after each step.
    """
    grads = np.asarray(grads, np.float64)
    thresholds = np.broadcast_to(np.asarray(threshold, np.float64), grads.shape[:1])
    v = np.zeros(grads.shape[1:])
    outs, masks, vs = [], [], []
    for t, g in enumerate(grads, start=1):
        g = g.copy()
        mask = np.zeros(g.shape, bool)
        thres = thresholds[t - 1]
        if thres != 0 and t >= grad_accu_steps:
            with np.errstate(invalid="ignore"):  # inf * 0: NaN, no clip (as in torch)
                mask = g**2 > thres * v
            if pass_zero_v:
                mask &= v > 0
            g[mask] = np.sign(g[mask]) * np.sqrt(v[mask] * thres)
        v = beta * v + (1 - beta) * g * g
        outs.append(g)
        masks.append(mask)
        vs.append(v)
    return np.stack(outs), np.stack(masks), np.stack(vs)


def spiky_grads(steps, shape, *, seed, spikes=40, first_spike=25, scale=1.0):
    """Gaussian gradients whose per-coordinate scale drifts, with 100x-3000x spikes in
    single coordinates on random steps after ``first_spike``."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    coord_scale = np.exp(rng.uniform(-2, 2, size))  # coordinates of different sizes
    drift = np.linspace(1.0, 2.0, steps)[:, None]
    g = rng.standard_normal((steps, size)) * coord_scale * drift
    at = rng.integers(first_spike, steps, spikes)
    where = rng.integers(0, size, spikes)
    g[at, where] *= rng.uniform(100, 3000, spikes) * rng.choice([-1, 1], spikes)
    return (g * scale).reshape((steps, *shape)).astype(np.float32)


def run(tx, grads, params=None):
    """``tx`` over the leading axis of ``grads`` (a pytree) in a jitted lax.scan.

    Returns the outputs per step, the state after each step (stacked) and the final state.
    """

    def body(state, g):
        out, state = tx.update(g, state)
        return state, (out, state)

    init = tx.init(jax.tree.map(lambda x: x[0], grads) if params is None else params)
    final, (outs, states) = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(init, grads)
    return outs, states, final


def margin_ok(grads, vs, threshold, grad_accu_steps, rel=1e-5):
    """No active comparison ``g**2 > threshold * v`` sits within ``rel`` of equality, so
    float32 rounding cannot flip a decision (a precondition on the data)."""
    g2 = np.asarray(grads, np.float64) ** 2
    prev = np.concatenate([np.zeros_like(vs[:1]), vs[:-1]])
    bound = threshold * prev
    live = (np.arange(len(g2)) + 1 >= grad_accu_steps).reshape((-1,) + (1,) * (g2.ndim - 1))
    near = live & (bound > 0) & (np.abs(g2 - bound) <= rel * bound)
    return not near.any()


CONFIGS = [
    # The paper's defaults: clipping from step 20 (the reference's grad_accu_steps).
    dict(threshold=5000.0, beta=0.999, warmup_steps=19, steps=400),
    # Tight: ordinary coordinates are clipped too, and clipped values feed v.
    dict(threshold=4.0, beta=0.9, warmup_steps=2, steps=120),
    dict(threshold=50.0, beta=0.99, warmup_steps=0, steps=150),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"t{c['threshold']:g}_b{c['beta']}")
def test_matches_the_reference_rule_over_many_steps_with_coordinate_spikes(config):
    steps, threshold, beta, warmup = (
        config["steps"], config["threshold"], config["beta"], config["warmup_steps"]
    )  # fmt: skip
    grads = {
        "w": spiky_grads(steps, (6, 8), seed=1),
        "b": spiky_grads(steps, (8,), seed=2, scale=1e-3),
    }
    tx = optaxclip.spike_aware_clip(threshold, beta=beta, warmup_steps=warmup)
    outs, states, final = run(tx, jax.tree.map(jnp.asarray, grads))
    total_clipped = 0
    for key in grads:
        want, mask, vs = spam64(grads[key], threshold=threshold, beta=beta,
                                grad_accu_steps=warmup + 1, pass_zero_v=True)  # fmt: skip
        assert margin_ok(grads[key], vs, threshold, warmup + 1)
        if warmup > 0:  # then no coordinate meets the clip with v = 0: the literal rule
            literal = spam64(grads[key], threshold=threshold, beta=beta,
                             grad_accu_steps=warmup + 1)  # fmt: skip
            np.testing.assert_array_equal(literal[0], want)
        np.testing.assert_allclose(np64(outs[key]), want, rtol=2e-5, atol=0)
        # v is kept as its square root.
        np.testing.assert_allclose(np64(states.rms[key]) ** 2, vs, rtol=2e-5, atol=0)
        assert np.array_equal(np64(outs[key]) != grads[key], mask)
        total_clipped += mask.reshape(steps, -1).sum(axis=1)
    assert total_clipped[:warmup].sum() == 0
    assert total_clipped.sum() > 0
    size = sum(x[0].size for x in grads.values())
    np.testing.assert_allclose(np64(states.clipped_fraction), total_clipped / size, rtol=1e-6)
    np.testing.assert_array_equal(np64(states.stats.clipped), total_clipped > 0)
    assert int(final.stats.clip_count) == int(np.sum(total_clipped > 0))
    assert int(final.recorded) == steps
    # norm and clipped_norm: the global L2 norms of what came in and what went out.
    for t in (0, steps // 2, steps - 1):
        np.testing.assert_allclose(
            float(states.stats.norm[t]), norm64({k: g[t] for k, g in grads.items()}), rtol=1e-5
        )
        np.testing.assert_allclose(
            float(states.stats.clipped_norm[t]),
            norm64({k: o[t] for k, o in outs.items()}),
            rtol=1e-5,
        )
    np.testing.assert_array_equal(np64(states.stats.threshold), threshold)


def test_a_spike_in_one_coordinate_is_cut_back_where_a_global_clip_does_not_see_it():
    # 10,000 coordinates of RMS 1, one of them 40 at step 50: the global norm rises from
    # ~100 to ~108, under a global clip set 10% above the usual norm.
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((60, 10_000)).astype(np.float32)
    grads[50, 7] = 40.0
    outs, _, _ = run(optaxclip.spike_aware_clip(), {"g": jnp.asarray(grads)})
    want, mask, _ = spam64(grads, threshold=5000.0, beta=0.999, grad_accu_steps=20)
    assert mask[50, 7] and mask[50].sum() == 1
    np.testing.assert_allclose(float(outs["g"][50, 7]), want[50, 7], rtol=1e-5)
    assert float(outs["g"][50, 7]) < 20  # sqrt(5000 * v) with v ~ 5% of E[g**2]
    g50 = {"g": jnp.asarray(grads[50])}
    clip = optaxclip.clip_by_global_norm(1.1 * 100.0)
    assert float(jax.jit(clip.update)(g50, clip.init(g50))[0]["g"][7]) == 40.0


def test_a_scheduled_threshold_is_read_at_the_transforms_own_step_count():
    steps = 60
    grads = spiky_grads(steps, (16,), seed=3, first_spike=10)
    schedule = optax.linear_schedule(2.0, 40.0, transition_steps=steps)
    tx = optaxclip.spike_aware_clip(schedule, beta=0.9, warmup_steps=3)
    outs, states, _ = run(tx, {"g": jnp.asarray(grads)})
    per_step = np.array([float(schedule(t)) for t in range(steps)])
    want, mask, vs = spam64(grads, threshold=per_step, beta=0.9, grad_accu_steps=4)
    np.testing.assert_allclose(np64(outs["g"]), want, rtol=2e-5)
    np.testing.assert_allclose(np64(states.stats.threshold), per_step, rtol=1e-6)
    assert mask.any()


def test_a_schedule_that_goes_negative_raises_naming_the_threshold_and_the_step():
    tx = optaxclip.spike_aware_clip(lambda count: 3.0 - count, warmup_steps=0)
    g = {"g": jnp.ones(3)}
    step = jax.jit(tx.update)
    state = tx.init(g)
    for _ in range(4):
        _, state = step(g, state)
    with pytest.raises(Exception, match=r"threshold is -1\.0 at step 5"):
        jax.block_until_ready(step(g, state))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": -1.0}, ValueError, "threshold"),
        ({"threshold": float("nan")}, ValueError, "threshold"),
        ({"threshold": "5000"}, TypeError, "threshold"),
        ({"threshold": (1.0, 2.0)}, TypeError, "threshold"),
        ({"threshold": 1 + 2j}, TypeError, "threshold"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"warmup_steps": True}, TypeError, "warmup_steps"),
        ({"nonfinite": "skip"}, ValueError, "nonfinite"),
    ],
)
def test_bad_arguments_are_rejected_when_built_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.spike_aware_clip(**kwargs)


def test_an_injected_beta_outside_the_unit_interval_raises_at_run_time():
    tx = optax.inject_hyperparams(optaxclip.spike_aware_clip)(beta=0.9)
    g = {"g": jnp.ones(3)}
    state = tx.init(g)
    state.hyperparams["beta"] = jnp.asarray(1.5, jnp.float32)
    with pytest.raises(Exception, match=r"beta is 1\.5 at step 1"):
        jax.block_until_ready(jax.jit(tx.update)(g, state))


def test_injected_hyperparameters_warmup_included_give_the_plain_results():
    grads = {"g": jnp.asarray(spiky_grads(40, (12,), seed=4, first_spike=5))}
    kwargs = dict(threshold=4.0, beta=0.8, warmup_steps=3)
    plain, _, _ = run(optaxclip.spike_aware_clip(**kwargs), grads)
    injected, states, _ = run(optax.inject_hyperparams(optaxclip.spike_aware_clip)(**kwargs), grads)
    # Injected values are float32 arrays: 1 - beta is rounded from float32(beta).
    np.testing.assert_allclose(np64(injected["g"]), np64(plain["g"]), rtol=1e-6)
    assert int(states.hyperparams["warmup_steps"][0]) == 3


# ---------------------------------------------------------------------------------------
# Where the transform departs from the reference, on purpose (see the docstring).


def test_a_coordinate_whose_v_is_still_zero_is_not_zeroed_for_good():
    # A gated coordinate: zero gradient for 30 steps, then ordinary ones. The reference
    # compares its first non-zero gradient with threshold * 0, zeroes it, keeps v at 0
    # and so zeroes it on every later step.
    steps = 60
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((steps, 4)).astype(np.float32)
    grads[:30, 0] = 0.0
    ref, _, ref_v = spam64(grads, threshold=5000.0, beta=0.999, grad_accu_steps=20)
    assert np.all(ref[30:, 0] == 0) and np.all(ref_v[:, 0] == 0)

    outs, states, _ = run(optaxclip.spike_aware_clip(), {"g": jnp.asarray(grads)})
    got = np64(outs["g"])
    np.testing.assert_array_equal(got[:, 0], grads[:, 0])  # nothing to clip it against
    np.testing.assert_allclose(got[:, 1:], ref[:, 1:], rtol=2e-5)
    # From then on it is judged like the others: its v is the reference's v of the
    # same coordinate started at step 31.
    _, _, v_from_31 = spam64(
        grads[30:, :1], threshold=5000.0, beta=0.999, grad_accu_steps=1, pass_zero_v=True
    )
    np.testing.assert_allclose(np64(states.rms["g"][30:, 0]) ** 2, v_from_31[:, 0], rtol=2e-5)


def test_threshold_zero_turns_the_clip_off_as_in_the_reference_and_inf_never_clips():
    grads = {"g": jnp.asarray(spiky_grads(40, (8,), seed=6, first_spike=3))}
    for threshold in (0.0, float("inf")):
        outs, states, final = run(optaxclip.spike_aware_clip(threshold, warmup_steps=0), grads)
        np.testing.assert_array_equal(np64(outs["g"]), np64(grads["g"]))
        assert int(final.stats.clip_count) == 0
        want, _, vs = spam64(
            np64(grads["g"]), threshold=threshold, beta=0.999, grad_accu_steps=1, pass_zero_v=True
        )
        np.testing.assert_allclose(np64(states.rms["g"]) ** 2, vs, rtol=2e-5)


# ---------------------------------------------------------------------------------------
# NaN and inf: the policy, and v left alone.


def _with_bad_step(grads, step, value):
    grads = grads.copy()
    grads[step, 3] = value
    return grads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_step_passes_unchanged_and_leaves_v_and_the_warmup_alone(bad):
    steps, at = 50, 20
    clean = spiky_grads(steps, (10,), seed=7, first_spike=5)
    grads = _with_bad_step(clean, at, bad)
    tx = optaxclip.spike_aware_clip(4.0, beta=0.9, warmup_steps=2)
    outs, states, final = run(tx, {"g": jnp.asarray(grads)})
    got = np64(outs["g"])
    # The bad step comes back as it came in (NaN/inf where it was, the rest unclipped).
    np.testing.assert_array_equal(got[at], grads[at])
    np.testing.assert_array_equal(np64(states.rms["g"][at]), np64(states.rms["g"][at - 1]))
    assert int(states.recorded[at]) == at
    assert int(final.stats.nonfinite_count) == 1
    assert not bool(states.stats.clipped[at])
    # Every other step is the reference run without the bad step.
    kept = np.delete(clean, at, axis=0)
    want, _, vs = spam64(kept, threshold=4.0, beta=0.9, grad_accu_steps=3)
    np.testing.assert_allclose(np.delete(got, at, axis=0), want, rtol=2e-5)
    np.testing.assert_allclose(np64(final.rms["g"]) ** 2, vs[-1], rtol=2e-5)


def test_nonfinite_zero_returns_zeros_and_counts_the_step_as_clipped():
    grads = _with_bad_step(spiky_grads(8, (10,), seed=8, first_spike=2), 5, np.nan)
    tx = optaxclip.spike_aware_clip(nonfinite="zero", warmup_steps=0)
    outs, states, final = run(tx, {"g": jnp.asarray(grads)})
    np.testing.assert_array_equal(np64(outs["g"][5]), 0.0)
    assert bool(states.stats.clipped[5]) and float(states.stats.clipped_norm[5]) == 0.0
    np.testing.assert_array_equal(np64(states.rms["g"][5]), np64(states.rms["g"][4]))
    assert int(final.stats.nonfinite_count) == 1
    assert np.all(np.isfinite(np64(outs["g"])))


def test_nonfinite_error_raises_from_inside_jit_naming_the_step():
    tx = optaxclip.spike_aware_clip(nonfinite="error")
    g = {"g": jnp.ones(3)}
    step = jax.jit(tx.update)
    _, state = step(g, tx.init(g))
    with pytest.raises(Exception, match=r"spike_aware_clip.*at step 2"):
        jax.block_until_ready(step({"g": jnp.array([1.0, jnp.inf, 0.0])}, state))


# ---------------------------------------------------------------------------------------
# Dtypes: half precision in, half precision out, float32 arithmetic; float64; complex.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_leaves_keep_their_dtype_and_get_the_float32_rule(dtype):
    steps = 80
    # fp16 gradients up to 3e4 (their squares overflow fp16, not the float32 rule).
    raw = spiky_grads(steps, (12,), seed=9, first_spike=10, scale=10.0)
    raw = np.clip(raw, -3e4, 3e4)
    grads = np.asarray(jnp.asarray(raw, dtype).astype(jnp.float32))  # what goes in
    tx = optaxclip.spike_aware_clip(jnp.float32(8.0), beta=0.9, warmup_steps=2)
    outs, states, _ = run(tx, {"g": jnp.asarray(grads, dtype)})
    assert outs["g"].dtype == dtype
    assert states.rms["g"].dtype == jnp.float32
    want, mask, vs = spam64(grads, threshold=8.0, beta=0.9, grad_accu_steps=3)
    assert mask.any() and margin_ok(grads, vs, 8.0, 3, rel=1e-3)
    # Each clipped value is rounded to the leaf's dtype once; v takes in the float32 one.
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np64(outs["g"]), want, rtol=eps, atol=0)
    np.testing.assert_allclose(np64(states.rms["g"]) ** 2, vs, rtol=1e-5)


def test_float64_leaves_keep_v_in_float64():
    with jax.enable_x64(True):
        grads = spiky_grads(60, (10,), seed=10, first_spike=5).astype(np.float64) * np.pi
        tx = optaxclip.spike_aware_clip(4.0, beta=0.9, warmup_steps=2)
        outs, states, _ = run(tx, {"g": jnp.asarray(grads)})
        assert outs["g"].dtype == jnp.float64 and states.rms["g"].dtype == jnp.float64
        want, mask, vs = spam64(grads, threshold=4.0, beta=0.9, grad_accu_steps=3)
        assert mask.any()
        np.testing.assert_allclose(np64(outs["g"]), want, rtol=1e-12)
        np.testing.assert_allclose(np64(states.rms["g"]) ** 2, vs, rtol=1e-12)


def test_complex_leaves_are_judged_by_their_magnitude_and_keep_their_phase():
    rng = np.random.default_rng(11)
    steps = 40
    z = (rng.standard_normal((steps, 6)) + 1j * rng.standard_normal((steps, 6))).astype(
        np.complex64
    )
    z[30, 2] *= 500
    tx = optaxclip.spike_aware_clip(6.0, beta=0.9, warmup_steps=3)
    outs, states, _ = run(tx, {"z": jnp.asarray(z)})
    assert outs["z"].dtype == jnp.complex64 and states.rms["z"].dtype == jnp.float32
    # The reference rule on |z|, with the phase of z.
    mag, mask, vs = spam64(np.abs(z), threshold=6.0, beta=0.9, grad_accu_steps=4)
    want = mag * np.exp(1j * np.angle(z.astype(np.complex128)))
    assert mask[30, 2]
    np.testing.assert_allclose(np64(outs["z"]), want, rtol=2e-5)
    np.testing.assert_allclose(np64(states.rms["z"]) ** 2, vs, rtol=2e-5)


def test_v_stays_finite_and_exact_from_1e_minus_30_to_1e30():
    # g**2 overflows float32 above ~1.8e19 and flushes to 0 below ~1e-19: v kept as
    # sqrt(v) does neither, and the rule holds at both ends.
    for scale in (1e30, 1e-30):
        grads = spiky_grads(50, (8,), seed=12, first_spike=5, scale=scale)
        tx = optaxclip.spike_aware_clip(4.0, beta=0.9, warmup_steps=2)
        outs, states, _ = run(tx, {"g": jnp.asarray(grads)})
        want, mask, vs = spam64(grads, threshold=4.0, beta=0.9, grad_accu_steps=3)
        assert mask.any()
        assert np.all(np.isfinite(np64(outs["g"]))) and np.all(np64(outs["g"]) != 0)
        np.testing.assert_allclose(np64(outs["g"]), want, rtol=2e-5)
        np.testing.assert_allclose(np64(states.rms["g"]), np.sqrt(vs), rtol=2e-5)


def test_statistics_are_the_norms_before_and_after_from_1e_minus_30_to_1e30():
    # Both norms come out of one read per leaf; their squares overflow (1e30) or flush
    # to zero (1e-30) in float32, which the rescue branch sums again rescaled.
    for scale in (1e30, 1.0, 1e-30):
        grads = spiky_grads(12, (8,), seed=3, first_spike=5, scale=scale)
        tx = optaxclip.spike_aware_clip(4.0, beta=0.9, warmup_steps=2)
        outs, states, _ = run(tx, {"g": jnp.asarray(grads)})
        for k in range(len(grads)):
            assert float(states.stats.norm[k]) == pytest.approx(norm64(grads[k]), rel=1e-5, abs=0)
            got = float(states.stats.clipped_norm[k])
            assert got == pytest.approx(norm64(outs["g"][k]), rel=1e-5, abs=0)


def test_statistics_of_a_leaf_of_a_million_elements_are_float64s():
    # Summed one element after another (XLA:CPU's multi-output reduction), the norms
    # of a leaf of 2M were 6.3e-4 off; both layouts sum by rows or apart.
    g = np.random.default_rng(12).standard_normal((2, 1_000_003)).astype(np.float32)
    tx = optaxclip.spike_aware_clip(4.0, beta=0.5, warmup_steps=1)
    outs, states, _ = run(tx, {"g": jnp.asarray(g)})
    assert np.any(np64(outs["g"][1]) != g[1])  # the second step clipped
    for k in range(2):
        assert float(states.stats.norm[k]) == pytest.approx(norm64(g[k]), rel=1e-6, abs=0)
        want = norm64(outs["g"][k])
        assert float(states.stats.clipped_norm[k]) == pytest.approx(want, rel=1e-6, abs=0)


def test_the_clipped_norm_of_a_bf16_leaf_is_that_of_the_values_returned():
    grads = spiky_grads(12, (64,), seed=5, first_spike=5)
    tx = optaxclip.spike_aware_clip(4.0, beta=0.9, warmup_steps=2)
    outs, states, _ = run(tx, {"g": jnp.asarray(grads, jnp.bfloat16)})
    for k in range(len(grads)):
        got = float(states.stats.clipped_norm[k])
        assert got == pytest.approx(norm64(outs["g"][k]), rel=1e-6)


def test_none_leaves_and_empty_trees_pass_through():
    tx = optaxclip.spike_aware_clip(warmup_steps=0)
    tree = {"a": jnp.ones(2), "frozen": None}
    out, state = tx.update(tree, tx.init(tree))
    assert out["frozen"] is None and state.rms["frozen"] is None
    out, state = tx.update({}, tx.init({}))
    assert out == {} and float(state.clipped_fraction) == 0.0 and int(state.stats.count) == 1


def test_an_integer_leaf_raises_naming_its_path():
    tx = optaxclip.spike_aware_clip()
    tree = {"ok": jnp.ones(2), "ids": jnp.arange(3)}
    with pytest.raises(TypeError, match=r"\['ids'\]"):
        tx.update(tree, tx.init(tree))


def test_a_state_built_for_another_tree_is_refused_with_what_to_do():
    tx = optaxclip.spike_aware_clip()
    with pytest.raises(ValueError, match=r"tx\.init\(params\)"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


def test_init_gives_every_leaf_its_own_buffer():
    params = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones((), jnp.bfloat16)}
    state = optaxclip.spike_aware_clip().init(params)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers)
    assert all(x.size > 0 for x in jax.tree.leaves(state))


def test_the_derivative_through_the_clip_is_one_where_it_passes_and_zero_where_it_clips():
    # The bound comes from the state (past gradients), so a clipped coordinate does not
    # depend on this step's gradient; a passed one is the identity.
    tx = optaxclip.spike_aware_clip(4.0, beta=0.5, warmup_steps=0)
    first = {"g": jnp.array([1.0, 1.0, 0.0, -1.0])}
    _, state = jax.jit(tx.update)(first, tx.init(first))
    g = {"g": jnp.array([0.5, 30.0, 0.0, -30.0])}
    jac = jax.jit(jax.jacobian(lambda g: tx.update(g, state)[0]["g"]))(g)["g"]
    np.testing.assert_array_equal(np.diag(np64(jac)), [1.0, 0.0, 1.0, 0.0])
    assert np.all(np.isfinite(np64(jac)))


def test_the_gradient_through_many_steps_is_finite_also_at_zeros_and_for_complex():
    seq = {
        "r": jnp.asarray(spiky_grads(12, (5,), seed=13, first_spike=4)).at[:, 0].set(0.0),
        "z": jnp.asarray(spiky_grads(12, (3,), seed=14, first_spike=4)).astype(jnp.complex64),
    }
    tx = optaxclip.spike_aware_clip(3.0, beta=0.8, warmup_steps=1)

    def loss(seq):
        outs, _, final = run_unjitted(tx, seq)
        total = sum(jnp.sum(jnp.abs(o) ** 2) for o in jax.tree.leaves(outs))
        return total + sum(jnp.sum(r) for r in jax.tree.leaves(final.rms))

    grads = jax.jit(jax.grad(loss))(seq)
    assert all(np.all(np.isfinite(np64(x))) for x in jax.tree.leaves(grads))


def run_unjitted(tx, grads):
    def body(state, g):
        out, state = tx.update(g, state)
        return state, out

    final, outs = jax.lax.scan(body, tx.init(jax.tree.map(lambda x: x[0], grads)), grads)
    return outs, None, final


# ---------------------------------------------------------------------------------------
# The TPU layout's measurement of the clipped values: three scales in one read, no rescue.


def _clip_to(x, limit):
    """Each element clipped to its own limit: a map whose values may fall far below
    the leaf's (the limits span 60 decades), as SPAM's bound does where v is tiny."""
    over = jnp.abs(x) > limit
    return jnp.where(over, jnp.sign(x) * limit.astype(x.dtype), x), over


def _clip_to64(x, limit):
    x, limit = np64(x), np64(limit)
    return np.where(np.abs(x) > limit, np.sign(x) * limit, x), np.abs(x) > limit


def _tree_and_limits(scale, seed):
    """Small leaves (bucketed, two dtypes), a big leaf and their per-element limits."""
    rng = np.random.default_rng(seed)
    shapes = [(3,), (17,), (100,), (1000,), (SMALL_LEAF - 1,), (SMALL_LEAF, 2)] * 4
    tree, limits = {}, {}
    for i, shape in enumerate(shapes):
        x = rng.standard_normal(shape) * np.asarray(scale(i), np.float64)
        dtype = jnp.bfloat16 if i in (7, 8) else jnp.float32
        tree[f"w{i:02d}"] = jnp.asarray(x, dtype)
        exponents = rng.uniform(-30, 30, shape)
        # Normal numbers (XLA:CPU flushes subnormal ones to zero).
        limit = np.clip(np.abs(x) * 10.0**exponents, 1e-36, 1e36)
        limits[f"w{i:02d}"] = jnp.asarray(limit, dtype)
    return tree, limits


@pytest.mark.parametrize(
    "case",
    ["normal", "huge", "tiny", "huge beside tiny", "limits far below", "nan", "inf"],
)
def test_the_clipped_values_are_measured_as_in_float64_over_the_whole_range(case):
    """map_and_measure_mapped: the norm of the mapped tree and the count, with no rescue
    branch, equal float64's where the sums overflow (1e25), flush to zero (1e-25), both
    in one tree, and where the clipped values lie 30 decades below the leaves (big
    leaves summed apart in the TPU layout, together in the CPU one)."""
    scales = {
        "normal": lambda i: 1.0,
        "huge": lambda i: 1e25,
        "tiny": lambda i: 1e-25,
        "huge beside tiny": lambda i: 1e25 if i == 4 else 1e-25,
        "limits far below": lambda i: 1e8,
        "nan": lambda i: 1.0,
        "inf": lambda i: 1.0,
    }
    tree, limits = _tree_and_limits(scales[case], seed=len(case))
    if case == "limits far below":
        limits = jax.tree.map(lambda x: jnp.abs(x) * 1e-30, tree)
    if case in ("nan", "inf"):
        tree["w05"] = tree["w05"].at[7].set(float(case))
        limits["w05"] = limits["w05"].at[7].set(float("inf"))  # passed: kept in the map
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    limit_leaves = jax.tree_util.tree_leaves(limits)
    units, _ = _mechanics._measured_units(leaves, (limit_leaves,), [True] * len(leaves), None)
    assert sum(len(u) > 1 for u in units) >= 2  # buckets, and the big leaves alone

    @jax.jit
    def measure(leaves, limit_leaves):
        return _mechanics.map_and_measure_mapped(
            leaves,
            _clip_to,
            after=optaxclip.global_norm(leaves),
            axis_name=None,
            flags=[True] * len(leaves),
            aligned=(limit_leaves,),
        )

    out, norm, count = measure(leaves, limit_leaves)
    want = [_clip_to64(x, r) for x, r in zip(leaves, limit_leaves, strict=True)]
    for got, (y, _) in zip(out, want, strict=True):
        np.testing.assert_array_equal(np64(got), np64(jnp.asarray(y, got.dtype)))
    assert float(count) == sum(int(mask.sum()) for _, mask in want)
    if case in ("nan", "inf"):
        assert np.isnan(float(norm)) if case == "nan" else float(norm) == float("inf")
        return
    want_norm = norm64([np64(y) for y in out])
    assert float(norm) == pytest.approx(want_norm, rel=1e-5, abs=0)
    if case != "normal":
        assert want_norm < 1e-19 or want_norm > 1e19 or case == "limits far below"


def test_the_clipped_values_measure_the_same_whatever_the_norm_they_follow():
    # The scales are tied to `after`, halved where it is NaN, and divided out again.
    g = [jnp.asarray([3e25, -4e25, 1.0]), jnp.asarray([5e-30, 0.0])]
    limits = [jnp.full((3,), 1e30), jnp.full((2,), 1.0)]
    def measure(g, limits, after):
        _, norm, _ = _mechanics.map_and_measure_mapped(
            g, _clip_to, after=after, axis_name=None, flags=[True, True], aligned=(limits,)
        )
        return norm

    for after in (1.0, float("nan"), float("inf"), 0.0):
        after = jnp.float32(after)
        assert float(measure(g, limits, after)) == pytest.approx(5e25, rel=1e-6)
        assert float(jax.jit(measure)(g, limits, after)) == pytest.approx(5e25, rel=1e-6)


_EDGES = {
    # A tiny total of values just under the clamp of the up-scaled sum (2^-20).
    "under the clamp": ([5e-7, -3e-7, 4e-7], np.float32),
    # Around the smallest normal float32, whose squares flush unless scaled far up.
    "smallest normal": ([2e-38, -5e-38, 1e-37], np.float32),
    # Around the largest float32 (the norm itself is finite), squares scaled far down.
    "largest": ([1e38, -1.5e38, 2e38], np.float32),
    "float64 huge": ([1e300, -3e300, 2e300], np.float64),
    "float64 tiny": ([1e-300, -3e-300, 2e-300], np.float64),
    "complex huge": ([3e25 + 4e25j, -1e25j, 2e25], np.complex64),
    "complex tiny": ([3e-25 - 4e-25j, 1e-25j, 2e-25], np.complex64),
}


@pytest.mark.parametrize("edge", list(_EDGES))
def test_the_clipped_values_are_measured_at_the_edges_of_each_dtype(edge):
    """The three scales at the ends of float32's and float64's ranges, and for complex
    values (|z|^2 from both parts), against float64 (or a scaled float64 sum): each
    edge fails if its scale (or the clamp) is off by a few binades."""
    values, dtype = _EDGES[edge]
    with jax.enable_x64(dtype == np.float64):
        x = jnp.asarray(np.asarray(values, dtype))
        zeros = jnp.zeros((SMALL_LEAF * 2,), x.real.dtype)  # a big leaf, summed on its own
        leaves = [x, zeros]
        limits = [jnp.full(x.shape, jnp.inf, x.real.dtype), jnp.full(zeros.shape, 1.0, zeros.dtype)]

        @jax.jit
        def measure(leaves, limits):
            return _mechanics.map_and_measure_mapped(
                leaves, _clip_to, after=optaxclip.global_norm(leaves), axis_name=None,
                flags=[True, True], aligned=(limits,),
            )

        _, norm, count = measure(leaves, limits)
    big = np.max(np.abs(np.asarray(values, np.complex128)))
    want = big * np.sqrt(np.sum(np.abs(np.asarray(values, np.complex128) / big) ** 2))
    assert float(norm) == pytest.approx(want, rel=1e-6, abs=0)
    assert float(count) == 0


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25])
def test_the_gradient_of_the_clipped_norm_is_that_of_float64(scale):
    x = np.array([1.0, 0.2, -3.0, 0.0, 0.4]) * scale
    limit = np.full_like(x, 0.5 * scale)

    def clipped_norm(x):
        _, norm, _ = _mechanics.map_and_measure_mapped(
            [x], _clip_to, after=optaxclip.global_norm(x), axis_name=None, flags=[True],
            aligned=([jnp.asarray(limit, jnp.float32)],),
        )
        return norm * (1 / scale)

    y, inside = np.clip(x, -limit, limit), np.abs(x) < limit
    want = y * inside / np.linalg.norm(y) / scale
    got = jax.jit(jax.grad(clipped_norm))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np64(got) * scale**2, want * scale**2, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Properties over random gradients, thresholds and decays.


@jax.jit
def _six_steps(seq, threshold, beta):
    """spike_aware_clip over ``seq`` with traced threshold and beta (few compilations)."""
    return run_unjitted(optaxclip.spike_aware_clip(threshold, beta=beta, warmup_steps=1), seq)


@st.composite
def sequences(draw):
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    low, high = (-4, 3) if dtype == jnp.float16 else (-30, 30)
    decade = draw(st.integers(low, high))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((6, 7)) * 10.0**decade
    x *= np.where(rng.random((6, 7)) < 0.1, rng.uniform(10, 1000, (6, 7)), 1.0)
    if dtype == jnp.float16:
        x = np.clip(x, -6e4, 6e4)
    return jnp.asarray(x, dtype)


@given(sequences(), st.floats(1.0, 1e4), st.floats(0.5, 0.999))
def test_every_coordinate_passes_or_is_pulled_toward_zero_keeping_its_sign(seq, threshold, beta):
    outs, _, final = _six_steps({"g": seq}, jnp.float32(threshold), jnp.float32(beta))
    got, given_ = np64(outs["g"]), np64(seq)
    assert outs["g"].dtype == seq.dtype
    assert np.all(np.isfinite(got))
    changed = got != given_
    assert np.all(np.sign(got[changed]) == np.sign(given_[changed]))
    assert np.all(np.abs(got[changed]) <= np.abs(given_[changed]))
    # Nothing is clipped in the warm-up step, and a non-zero coordinate stays non-zero
    # (the bound is at least sqrt(threshold * (1 - beta)) times an earlier gradient).
    assert not changed[0].any()
    tiny = float(jnp.finfo(seq.dtype).smallest_subnormal)
    assert np.all((got != 0) | (given_ == 0) | (np.abs(given_) < 1e3 * tiny))
    assert np.all(np.isfinite(np64(final.rms["g"])))


@given(
    st.lists(st.floats(-30, 30), min_size=8, max_size=8),
    st.floats(0.5, 0.9999),
)
def test_v_is_the_ema_of_g_squared_over_sixty_decades(decades, beta):
    # threshold inf: nothing is clipped and v is the plain EMA of g**2.
    g = (10.0 ** np.asarray(decades))[:, None] * np.array([1.0, -0.5])
    g = g.astype(np.float32)
    _, _, final = _six_steps({"g": jnp.asarray(g)}, jnp.float32(np.inf), jnp.float32(beta))
    v = np.zeros(2)
    b = float(np.float32(beta))
    for row in g.astype(np.float64):
        v = b * v + (1 - b) * row**2
    np.testing.assert_allclose(np64(final.rms["g"]), np.sqrt(v), rtol=1e-5)


@pytest.mark.parametrize("inject", [False, True], ids=["concrete", "injected"])
@pytest.mark.parametrize(
    ("threshold", "spike"), [(1e39, 1e300), (1e-40, 1e30), (1e-46, 1e30)]
)
def test_a_float64_leaf_is_clipped_at_its_threshold_in_float64(threshold, spike, inject):
    # SPAM's rule after one step of g = 1 (v = (1 - beta) * 1): a spike is cut to
    # sqrt(threshold * v). The threshold was float32: injected, 1e39 became inf (the
    # 1e300 spike passed) and 1e-40 flushed to 0; concrete, 1e-46 (0 in float32) turned
    # the clip off.
    with jax.enable_x64(True):
        build = lambda threshold: optaxclip.spike_aware_clip(threshold, warmup_steps=1)
        tx = optax.inject_hyperparams(build)(threshold=threshold) if inject else build(threshold)
        one = {"w": jnp.ones(1, jnp.float64)}
        state, update = tx.init(one), jax.jit(tx.update)
        _, state = update(one, state)
        out, _ = update({"w": jnp.full(1, spike, jnp.float64)}, state)
        want = np.sqrt(threshold) * np.sqrt(1 - 0.999)
        np.testing.assert_allclose(np.asarray(out["w"]), [want], rtol=1e-12)
