"""Tests for optaxclip._diagnose (diagnose / Diagnosis)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from optaxclip._diagnose import Diagnosis, diagnose  # noqa: E402

HIDING = "hiding a problem"
LOOSE = "too loose"
NONFINITE = "non-finite"
TREND = "trending upward"


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
