"""Tests for optaxclip._diagnose (diagnose / Diagnosis)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import optaxclip  # noqa: E402
from optaxclip._diagnose import Diagnosis, diagnose  # noqa: E402

HIDING = "hiding a problem"
LOOSE = "too loose"
NONFINITE = "non-finite"
TREND = "trending upward"
RAISE = "raise max_norm"
DIVERGING = "diverging"
STALLING = "stalling"


def _records(norms, threshold=None, prefix=""):
    """Build stats()-like dicts from norms; clipped = norm > threshold when one is given."""
    out = []
    nonfinite = 0
    clips = 0
    for i, n in enumerate(norms):
        n = float(n)
        rec = {f"{prefix}count": i + 1, f"{prefix}norm": np.float32(n)}
        if not math.isfinite(n):
            nonfinite += 1
        rec[f"{prefix}nonfinite_count"] = nonfinite
        if threshold is not None:
            clipped = bool(math.isfinite(n) and n > threshold)
            clips += clipped
            rec.update(
                {
                    f"{prefix}threshold": threshold,
                    f"{prefix}clipped": np.bool_(clipped),
                    f"{prefix}clip_count": clips,
                    f"{prefix}clipped_norm": min(n, threshold) if math.isfinite(n) else n,
                }
            )
        out.append(rec)
    return out


def _lognormal(n=500, sigma=0.3, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * np.exp(rng.normal(0.0, sigma, size=n))


def _has(d: Diagnosis, text: str) -> bool:
    return any(text in w for w in d.warnings)


# --------------------------------------------------------------------------- statistics


def test_percentiles_match_numpy_on_finite_norms():
    norms = _lognormal(300, seed=1)
    norms[[3, 77, 200]] = [np.nan, np.inf, -np.inf]
    d = diagnose(_records(norms, threshold=1.5))
    finite = norms[np.isfinite(norms)]
    assert set(d.percentiles) == {50, 90, 99}
    for q in (50, 90, 99):
        assert d.percentiles[q] == pytest.approx(np.percentile(finite, q), rel=1e-6)
        assert isinstance(d.percentiles[q], float)


def test_clip_rate_is_fraction_of_clipped_steps():
    norms = _lognormal(400, seed=2)
    thr = 1.3
    d = diagnose(_records(norms, threshold=thr))
    expected = np.mean(norms.astype(np.float32) > thr)
    assert d.clip_rate == pytest.approx(expected)
    assert d.num_clip_recorded == 400
    assert d.threshold == pytest.approx(thr)


def test_column_form_with_scalar_threshold():
    norms = _lognormal(200, seed=3)
    clipped = norms > 1.2
    d = diagnose({"norm": norms, "threshold": 1.2, "clipped": clipped})
    assert d.clip_rate == pytest.approx(clipped.mean())
    assert d.percentiles[50] == pytest.approx(np.percentile(norms, 50))
    np.testing.assert_allclose(d.thresholds, np.full(200, 1.2))


def test_column_length_mismatch_raises():
    with pytest.raises(ValueError, match="entries"):
        diagnose({"norm": np.ones(5), "clipped": np.zeros(4, bool)})


# --------------------------------------------------------------------------- warnings


def test_healthy_history_has_no_warnings():
    norms = _lognormal(500, sigma=0.3, seed=0)
    thr = float(np.exp(0.3 * 2.0))  # ~1.82: just above typical, clips ~2%
    d = diagnose(_records(norms, threshold=thr))
    assert 0.0 < d.clip_rate < 0.05
    assert d.warnings == []
    assert d.nonfinite_count == 0
    # The suggestion sits just above the typical range.
    assert d.percentiles[90] < d.suggested_max_norm < 1.5 * norms.max()
    assert "warnings: none" in str(d)


def test_clipping_nearly_every_step_warns_hiding_problem():
    norms = _lognormal(300, seed=4)
    thr = 0.5  # far below the median of 1
    d = diagnose(_records(norms, threshold=thr))
    assert d.clip_rate > 0.9
    assert _has(d, HIDING)
    msg = next(w for w in d.warnings if HIDING in w)
    assert "learning rate" in msg
    assert not _has(d, LOOSE)


def test_moderate_clipping_does_not_warn_hiding():
    norms = _lognormal(300, seed=4)
    d = diagnose(_records(norms, threshold=float(np.percentile(norms, 70))))
    assert d.clip_rate == pytest.approx(0.3, abs=0.01)
    assert not _has(d, HIDING)


def test_too_few_steps_do_not_warn_hiding():
    d = diagnose(_records(np.full(10, 2.0), threshold=1.0))
    assert d.clip_rate == 1.0
    assert not _has(d, HIDING)


def test_never_clipping_far_threshold_warns_too_loose():
    norms = _lognormal(200, seed=5, scale=0.01)
    d = diagnose(_records(norms, threshold=1.0))
    assert d.clip_rate == 0.0
    assert _has(d, LOOSE)
    assert not _has(d, HIDING)


def test_never_clipping_tight_threshold_or_short_history_no_warning():
    norms = _lognormal(200, seed=5)
    # Threshold just above the max: never clipped but not "far above" the 99th percentile.
    d = diagnose(_records(norms, threshold=float(norms.max()) * 1.05))
    assert d.clip_rate == 0.0
    assert not _has(d, LOOSE)
    # Far-off threshold but too few steps to judge.
    d = diagnose(_records(norms[:50], threshold=100.0))
    assert not _has(d, LOOSE)


def test_nonfinite_norms_warn_and_are_counted():
    norms = _lognormal(200, seed=6)
    norms[[10, 50, 51]] = [np.nan, np.inf, np.nan]
    d = diagnose(_records(norms, threshold=2.0))
    assert d.nonfinite_count == 3
    assert _has(d, NONFINITE)
    assert "3 of 200" in str(d)
    # Plain arrays too.
    d = diagnose(norms)
    assert d.nonfinite_count == int((~np.isfinite(norms)).sum()) == 3
    assert _has(d, NONFINITE)


def test_nonfinite_count_uses_larger_cumulative_counter():
    # A window of a longer run: the cumulative counter already saw 7 non-finite steps.
    recs = [{"norm": 1.0 + 0.01 * i, "nonfinite_count": 7} for i in range(30)]
    d = diagnose(recs)
    assert d.nonfinite_count == 7
    assert _has(d, NONFINITE)


def test_all_nonfinite():
    d = diagnose(np.array([np.nan, np.inf, np.nan]))
    assert d.nonfinite_count == 3
    assert all(math.isnan(v) for v in d.percentiles.values())
    assert math.isnan(d.suggested_max_norm)
    assert _has(d, "NaN or inf")
    str(d)


def test_all_zero_norms_warn():
    d = diagnose(np.zeros(50))
    assert _has(d, "exactly zero")
    assert math.isnan(d.suggested_max_norm)


def test_exponential_growth_warns_trend():
    rng = np.random.default_rng(7)
    t = np.arange(300)
    norms = np.exp(0.02 * t + rng.normal(0, 0.3, size=t.size))
    d = diagnose(norms)
    assert _has(d, TREND)


def test_flat_noisy_and_decreasing_do_not_warn_trend():
    assert not _has(diagnose(_lognormal(300, sigma=0.5, seed=8)), TREND)
    t = np.arange(300)
    assert not _has(diagnose(10.0 * np.exp(-0.01 * t) * _lognormal(300, seed=9)), TREND)
    # Short growing histories are not judged.
    assert not _has(diagnose(np.exp(0.1 * np.arange(20))), TREND)


# --------------------------------------------------------------------------- input forms


def test_plain_array_and_list_of_norms():
    norms = _lognormal(100, seed=10)
    for h in (norms, list(norms), tuple(norms.tolist())):
        d = diagnose(h)
        assert d.clip_rate is None
        assert d.threshold is None
        assert d.num_steps == 100
        assert d.percentiles[99] == pytest.approx(np.percentile(norms, 99))
    assert "n/a" in str(diagnose(norms))


def test_jax_values_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    norms = _lognormal(30, seed=11)
    recs = [{"norm": jnp.asarray(n), "clipped": jnp.asarray(n > 1.2)} for n in norms]
    d = diagnose(recs)
    assert d.clip_rate == pytest.approx(np.mean(norms > 1.2))
    d = diagnose(jnp.asarray(norms))
    assert d.percentiles[50] == pytest.approx(np.median(norms), rel=1e-5)


def test_prefixed_keys():
    norms = _lognormal(120, seed=12)
    recs = _records(norms, threshold=1.4, prefix="0/clip_by_global_norm/")
    # A second transform's keys come later and must not be picked up.
    for r in recs:
        r["1/adaptive_clip/norm"] = 1000.0
        r["1/adaptive_clip/clipped"] = True
    d = diagnose(recs)
    assert d.percentiles[50] == pytest.approx(np.median(norms.astype(np.float32)), rel=1e-6)
    assert d.clip_rate == pytest.approx(np.mean(norms.astype(np.float32) > 1.4))
    assert d.threshold == pytest.approx(1.4)
    # Column form with prefix.
    d = diagnose({"a/norm": norms, "a/clipped": norms > 1.4})
    assert d.clip_rate == pytest.approx(np.mean(norms > 1.4))


def test_steps_taken_from_count():
    recs = [{"count": 10 * (i + 1), "norm": 1.0} for i in range(5)]
    np.testing.assert_array_equal(diagnose(recs).steps, [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(diagnose(np.ones(3)).steps, [0, 1, 2])


@pytest.mark.parametrize(
    "history",
    [[], (), np.array([]), {"norm": np.array([])}],
)
def test_empty_history_raises(history):
    with pytest.raises(ValueError, match="empty"):
        diagnose(history)


@pytest.mark.parametrize(
    "history",
    [
        [{"clipped": True, "threshold": 1.0}],
        {"threshold": np.ones(3)},
        [{"norm": 1.0}, {"clipped": True}],
    ],
)
def test_history_without_norm_raises(history):
    with pytest.raises(ValueError, match="norm"):
        diagnose(history)


def test_malformed_histories_raise():
    with pytest.raises(ValueError):
        diagnose(np.ones((3, 2)))
    with pytest.raises(ValueError):
        diagnose([{"norm": 1.0}, 2.0])
    with pytest.raises(ValueError):
        diagnose("norm")


# --------------------------------------------------------------------------- suggestion


def test_suggested_max_norm_between_median_and_max_of_spiky_history():
    rng = np.random.default_rng(13)
    norms = _lognormal(1000, seed=13)
    spikes = rng.choice(norms.size, size=80, replace=False)  # 8% spikes, 50-500x
    norms[spikes] *= rng.uniform(50, 500, size=spikes.size)
    d = diagnose(norms)
    median = np.median(norms)
    assert median < d.suggested_max_norm < norms.max()
    # Robust to the spikes: close to the spike-free typical range, far below the spikes.
    assert d.suggested_max_norm < 5 * median
    assert d.suggested_max_norm < np.percentile(norms, 95)


def test_suggested_max_norm_rule():
    norms = _lognormal(400, seed=14)  # no spikes beyond 3 sigma to speak of
    logs = np.log(norms)
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    kept = norms[logs <= med + 3 * mad]
    assert diagnose(norms).suggested_max_norm == pytest.approx(1.25 * np.percentile(kept, 95))


# --------------------------------------------------------------------------- report / plot


def test_str_contains_percentiles_and_warnings():
    norms = _lognormal(200, seed=15)
    norms[5] = np.nan
    d = diagnose(_records(norms, threshold=0.3))
    s = str(d)
    assert repr(d) == s == d.report()
    for q in (50, 90, 99):
        assert f"p{q}={d.percentiles[q]:.4g}" in s
    assert f"{100 * d.clip_rate:.1f}%" in s
    assert f"{d.suggested_max_norm:.4g}" in s
    assert len(d.warnings) >= 2
    flat = " ".join(s.split())
    for w in d.warnings:
        assert " ".join(w.split()) in flat


def test_plot_draws_norms_threshold_and_clipped_steps():
    norms = _lognormal(150, seed=16)
    norms[[20, 21]] = [np.nan, np.inf]
    d = diagnose(_records(norms, threshold=1.3))
    ax = d.plot()
    try:
        assert ax.get_yscale() == "log"
        assert len(ax.lines) >= 3  # norms, threshold, suggested max_norm
        assert len(ax.collections) >= 2  # clipped markers, non-finite markers
        assert ax.get_legend() is not None
    finally:
        plt.close(ax.figure)


def test_plot_into_given_axes_and_plain_array():
    fig, ax = plt.subplots()
    try:
        out = diagnose(_lognormal(50, seed=17)).plot(ax=ax)
        assert out is ax
        assert len(ax.lines) >= 2  # norms, suggested max_norm
        fig.canvas.draw()
    finally:
        plt.close(fig)
    ax = diagnose(np.zeros(5)).plot()  # no positive norms: linear axis, no crash
    try:
        assert ax.get_yscale() == "linear"
    finally:
        plt.close(ax.figure)


# --------------------------------------------------------------------------- method


def _run(tx, steps=300, seed=0, grow=0.0, nan_every=0):
    """Real optaxclip stats: ``tx`` over ``steps`` random gradients under ``lax.scan``.

    The gradient's scale is log-normal (sigma 0.3) times ``exp(grow * step)``; with
    ``nan_every=k`` every step ``t`` with ``t % k == 1`` gets a NaN gradient. Returns the
    per-step ``stats()`` dicts, as a training loop logs them. The noise is drawn with NumPy,
    which keeps the compiled scan small.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    scale = np.exp(rng.normal(0.0, 0.3, size=steps) + grow * t)
    if nan_every:
        scale[t % nan_every == 1] = np.nan
    grads = {
        "w": (scale[:, None, None] * rng.normal(size=(steps, 8, 8)) / 8).astype(np.float32),
        "b": (scale[:, None] * rng.normal(size=(steps, 8)) / 8).astype(np.float32),
    }
    params = {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}

    def step(state, g):
        _, state = tx.update(g, state, params)
        return state, optaxclip.stats(state)

    _, cols = jax.lax.scan(step, tx.init(params), grads)
    cols = jax.device_get(cols)
    return [{k: v[i] for k, v in cols.items()} for i in range(steps)]


def _autoclip_history(n=300, percentile=10.0, seed=0, prefix=""):
    """A simulated healthy AutoClip run: log-normal norms, clipped above the running
    ``percentile`` of the norms so far (the current one included, as autoclip does)."""
    norms = _lognormal(n, sigma=0.3, seed=seed)
    out = []
    for i, g in enumerate(norms):
        thr = float(np.percentile(norms[: i + 1], percentile))
        out.append(
            {
                f"{prefix}count": i + 1,
                f"{prefix}norm": g,
                f"{prefix}threshold": thr,
                f"{prefix}clipped": bool(g > thr),
            }
        )
    return out


def _gives_raise_advice(d: Diagnosis) -> bool:
    return _has(d, HIDING) or _has(d, RAISE)


def test_healthy_autoclip_simulation_gets_no_raise_advice_from_prefixed_keys():
    d = diagnose(_autoclip_history(prefix="0/autoclip/"))
    assert d.method == "autoclip"
    assert d.clip_rate > 0.8  # clipping at the 10th percentile clips ~90% of steps
    assert not _gives_raise_advice(d)
    assert d.warnings == []
    assert "autoclip" in str(d).splitlines()[1]


def test_healthy_autoclip_simulation_gets_no_raise_advice_with_method_given():
    d = diagnose(_autoclip_history(), method="autoclip")
    assert d.method == "autoclip"
    assert d.clip_rate > 0.8
    assert d.warnings == []


def test_same_autoclip_history_with_unknown_method_keeps_fixed_threshold_advice():
    # Bare keys do not name the method: the fixed-max_norm rules apply, and say how to fix it.
    d = diagnose(_autoclip_history())
    assert d.method is None
    assert _has(d, HIDING)
    assert _has(d, RAISE)
    assert _has(d, 'method="autoclip"')
    assert "assuming a fixed max_norm" in str(d)


def test_real_autoclip_run_gets_no_raise_advice():
    hist = _run(optaxclip.autoclip(10.0))
    assert "norm" in hist[0]  # one clipping transform: bare keys
    d = diagnose(hist, method="autoclip")
    assert d.clip_rate > 0.8
    assert d.warnings == []
    assert diagnose(hist).method is None and _has(diagnose(hist), HIDING)
    # Beside another clip, stats() prefixes the keys and the method is read from them.
    import optax

    hist = _run(optax.chain(optaxclip.autoclip(10.0), optaxclip.clip_by_global_norm(1e6)))
    assert "0/autoclip/norm" in hist[0]
    d = diagnose(hist)
    assert d.method == "autoclip"
    assert d.clip_rate > 0.8
    assert d.warnings == []
    report = str(d)
    assert report.splitlines()[1].split()[1] == "autoclip"
    assert "global norm, for clip_by_global_norm" in report


def test_method_is_read_from_the_last_path_component():
    norms = _lognormal(60, seed=20)
    for prefix, method in [
        ("0/clip_by_global_norm/", "clip_by_global_norm"),
        ("skip_nonfinite/0/zclip/", "zclip"),
        ("skip_spikes/", "skip_spikes"),
        ("autoclip/", "autoclip"),
        ("opt/1/adagc#1/", "adagc"),  # stats() numbers a repeated name
        ("a/", None),
        ("1/adaptive_clip/", None),
    ]:
        assert diagnose({prefix + "norm": norms}).method == method, prefix


def test_explicit_method_wins_and_selects_its_keys():
    norms = _lognormal(100, seed=21)
    hist = {
        "0/clip_by_global_norm/norm": norms,
        "0/clip_by_global_norm/clipped": np.ones(100, bool),
        "1/autoclip/norm": 2 * norms,
        "1/autoclip/clipped": np.zeros(100, bool),
    }
    assert diagnose(hist).method == "clip_by_global_norm"
    assert diagnose(hist).clip_rate == 1.0
    d = diagnose(hist, method="autoclip")
    assert d.method == "autoclip"
    assert d.clip_rate == 0.0  # the autoclip keys were analysed
    assert d.percentiles[50] == pytest.approx(2 * np.median(norms))
    assert diagnose({"zclip/norm": norms}, method="ADAGC").method == "adagc"
    assert diagnose(norms, method="zclip").method == "zclip"


@pytest.mark.parametrize("method", ["agc", "clip", "", 3, "autoclip(10)"])
def test_invalid_method_raises_listing_the_names(method):
    with pytest.raises(ValueError, match="clip_by_global_norm.*autoclip.*skip_spikes"):
        diagnose(_lognormal(10), method=method)


def test_report_names_the_method_in_its_first_lines():
    norms = _lognormal(50, seed=22)
    assert "assuming a fixed max_norm" in "\n".join(str(diagnose(norms)).splitlines()[:2])
    for method in ("clip_by_global_norm", "zclip", "adaptive_grad_clip", "skip_spikes"):
        head = "\n".join(str(diagnose(norms, method=method)).splitlines()[:2])
        assert method in head


def test_agc_threshold_is_reported_as_a_clipping_ratio_not_a_norm():
    import optax

    hist = _run(optax.chain(optaxclip.adaptive_grad_clip(0.05), optaxclip.clip_by_global_norm(1e6)))
    d = diagnose(hist)
    assert d.method == "adaptive_grad_clip"
    assert d.threshold == pytest.approx(0.05)
    assert d.clip_rate > 0.5  # the weights are zero, so every step clips: by design
    assert d.warnings == []
    report = str(d)
    assert "clipping ratio:     0.05 (update-to-weight norm ratio, not a norm)" in report
    assert "threshold:" not in report
    sugg = next(line for line in report.splitlines() if "suggested max_norm" in line)
    assert "global norm, for clip_by_global_norm" in sugg
    # Same with bare keys and the method given.
    d = diagnose(_run(optaxclip.adaptive_grad_clip(0.05)), method="adaptive_grad_clip")
    assert "clipping ratio" in str(d) and d.warnings == []


def test_agc_never_clipping_is_not_judged_against_the_norms():
    # A ratio of 10 far "above" norms of 0.01 says nothing about looseness.
    hist = _records(_lognormal(200, seed=23, scale=0.01), threshold=10.0)
    assert _has(diagnose(hist), LOOSE)  # as a fixed max_norm it would be
    assert not _has(diagnose(hist, method="adaptive_grad_clip"), LOOSE)


def test_adagc_frequent_clipping_is_by_design():
    hist = _run(optaxclip.adagc())
    d = diagnose(hist, method="adagc")
    assert d.clip_rate > 0.8  # any tensor above 1.04x its own EMA: nearly every step
    assert d.warnings == []


def test_zclip_clipping_at_its_cap_is_called_a_fixed_clip_not_raise_advice():
    # max_norm=1.0 (the default) sits below these norms (median ~1.3): the cap clips.
    d = diagnose(_run(optaxclip.zclip()), method="zclip")
    assert d.clip_rate > 0.5
    assert len(d.warnings) == 1
    assert "max_norm cap" in d.warnings[0] and "fixed clip" in d.warnings[0]
    assert not _has(d, RAISE)
    # With the cap out of the way ZClip clips only spikes: no warning.
    d = diagnose(_run(optaxclip.zclip(max_norm=100.0)), method="zclip")
    assert d.clip_rate < 0.1
    assert d.warnings == []


def test_zclip_clipping_by_its_zscore_rule_on_most_steps_warns_without_raise_advice():
    norms = _lognormal(200, seed=24)
    thresholds = 0.5 * norms  # a different threshold on every clipped step
    hist = {"norm": norms, "threshold": thresholds, "clipped": np.ones(200, bool)}
    d = diagnose(hist, method="zclip")
    assert len(d.warnings) == 1
    assert "z-score" in d.warnings[0] and "z_thresh" in d.warnings[0]
    assert not _has(d, RAISE)


@pytest.mark.parametrize("method", ["clip_by_block_norm", "clip_by_block_rms", "clip_by_value"])
def test_per_block_and_value_bounds_keep_fixed_rules_with_labelled_advice(method):
    norms = _lognormal(300, seed=25)
    d = diagnose(_records(norms, threshold=0.1), method=method)
    assert _has(d, HIDING)
    assert not _has(d, "raise max_norm to about")  # a global-norm value is no block bound
    assert _has(d, "cannot suggest a value")
    d = diagnose(_records(0.01 * norms, threshold=1.0), method=method)
    assert _has(d, LOOSE)


def test_real_skip_spikes_history_is_read_and_reported_as_skips():
    import optax

    hist = _run(optaxclip.skip_spikes(optax.sgd(0.1), window=64, min_history=32))
    assert "consecutive_skips" in hist[0] and "norm" in hist[0]
    d = diagnose(hist)
    assert d.method == "skip_spikes"  # bare keys, but consecutive_skips and a finite threshold
    assert d.clip_rate < 0.05
    assert d.warnings == []
    report = str(d)
    assert "skip rate:" in report and "clip rate:" not in report
    assert "skip threshold:" in report
    assert d.max_consecutive_skips is not None and d.max_consecutive_skips <= 1


def test_real_skip_nonfinite_skipping_often_is_a_stalling_run():
    import optax

    hist = _run(optaxclip.skip_nonfinite(optax.sgd(0.1)), nan_every=4)  # 25% NaN batches
    d = diagnose(hist)
    assert d.method == "skip_wrapper"  # skip_nonfinite records inf: either wrapper could
    assert "a skip wrapper" in str(d).splitlines()[1]
    assert d.clip_rate == pytest.approx(0.25)
    assert d.nonfinite_count == 75
    assert not d.diverging
    assert _has(d, STALLING)
    assert _has(d, "max_consecutive_skips")
    assert not _gives_raise_advice(d)
    assert not _has(d, "optaxclip.skip_nonfinite")  # it is already in use
    d = diagnose(hist, method="skip_nonfinite")
    assert _has(d, STALLING) and _has(d, "skip_nonfinite skips only NaN/inf")


def test_long_run_of_skips_is_stalling_even_at_a_low_skip_rate():
    clipped = np.zeros(500, bool)
    clipped[100:112] = True
    hist = {"norm": _lognormal(500, seed=26), "clipped": clipped, "consecutive_skips": 0}
    d = diagnose(hist, method="skip_spikes")
    assert d.clip_rate < 0.05
    assert d.max_consecutive_skips == 12
    assert _has(d, STALLING)
    assert "longest run 12" in str(d)
    clipped[100:112] = False
    clipped[::50] = True  # 2%, never two in a row
    assert not _has(diagnose(hist, method="skip_spikes"), STALLING)


def test_diverging_history_is_called_divergence_with_an_early_suggestion():
    rng = np.random.default_rng(27)
    t = np.arange(400)
    norms = np.exp(0.03 * t + rng.normal(0, 0.3, size=t.size))  # 1 -> 1.6e5
    thr = 1.0
    d = diagnose(_records(norms, threshold=thr))
    assert d.diverging
    assert _has(d, DIVERGING)
    assert _has(d, TREND)
    early_p95 = np.percentile(norms[:100], 95)
    assert d.suggested_max_norm < 2 * early_p95
    assert d.suggested_max_norm < 1e-3 * norms.max()
    assert not _has(d, RAISE)  # it clips every step, but a larger clip is no answer
    assert "before the divergence" in str(d)
    # An adaptive method's divergence is still a divergence.
    d = diagnose(_run(optaxclip.autoclip(10.0), grow=0.03), method="autoclip")
    assert d.diverging and _has(d, DIVERGING)


def test_history_ending_in_nan_after_finite_norms_is_divergence():
    norms = np.concatenate(
        [_lognormal(150, seed=28), np.exp(np.arange(1.0, 30.0, 3.0)), np.full(40, np.nan)]
    )
    d = diagnose(norms)
    assert d.diverging
    assert _has(d, DIVERGING) and _has(d, NONFINITE)
    assert d.suggested_max_norm < 2 * np.percentile(norms[:50], 95)
    assert "before the divergence" in str(d)
    # A few NaN steps in the middle are not a divergence.
    norms = _lognormal(200, seed=28)
    norms[[50, 51, 52, 150]] = np.nan
    d = diagnose(norms)
    assert not d.diverging and not _has(d, DIVERGING) and _has(d, NONFINITE)


def test_healthy_histories_are_not_diverging():
    assert not diagnose(_lognormal(500, seed=29)).diverging
    d = diagnose(_records(_lognormal(500, seed=29), threshold=1.8))
    assert not d.diverging
    assert d.suggested_max_norm == pytest.approx(
        diagnose(_lognormal(500, seed=29)).suggested_max_norm
    )


def test_plot_labels_follow_the_method():
    hist = _records(_lognormal(100, seed=30), threshold=0.05)
    ax = diagnose(hist, method="adaptive_grad_clip").plot()
    try:
        labels = [line.get_label() for line in ax.lines]
        assert not any("threshold" in lab for lab in labels)  # a ratio is not drawn as a norm
        assert "adaptive_grad_clip" in ax.get_title()
    finally:
        plt.close(ax.figure)
    ax = diagnose(_records(_lognormal(100, seed=30), threshold=1.2), method="skip_spikes").plot()
    try:
        assert "skipped" in [c.get_label() for c in ax.collections]
    finally:
        plt.close(ax.figure)


def test_run_that_blows_up_from_its_first_steps_is_judged_by_its_first_norms():
    # Like a learning rate 50x too high: the norm grows ~30x a step, then turns NaN.
    norms = np.concatenate([2.6 * 30.0 ** np.arange(12), np.full(100, np.nan)])
    d = diagnose(norms)
    assert d.diverging
    assert d.suggested_max_norm < 10 * norms[0]
    assert "first 1 finite norms" in " ".join(" ".join(d.warnings).split())


def test_spike_aware_clip_run_is_read_as_adaptive_with_a_ratio_threshold():
    # A tight SPAM threshold clips a few coordinates on nearly every step, by design.
    import optax

    spam = optaxclip.spike_aware_clip(threshold=4.0, beta=0.9, warmup_steps=5)
    d = diagnose(_run(spam), method="spike_aware_clip")
    assert d.clip_rate > 0.8
    assert d.warnings == []  # no "raise max_norm": SPAM has no max_norm
    assert "not a norm" in str(d)
    # Beside another clip, the method is read from the stats() names.
    hist = _run(optax.chain(spam, optaxclip.clip_by_global_norm(1e6)))
    d = diagnose(hist)
    assert d.method == "spike_aware_clip" and d.warnings == []


def test_monitor_run_is_read_as_recording_only_and_never_called_too_loose():
    d = diagnose(_run(optaxclip.monitor()), method="monitor")
    assert d.clip_rate == 0.0
    assert d.warnings == []
    assert "nothing is clipped" in str(d)
