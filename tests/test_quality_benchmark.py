"""The quality benchmark (``python -m benchmarks --only quality``) on a tiny grid.

One run of the real code path (data from the standard library, both models, SGD with
momentum, a too-high learning rate and a cluster of bad batches), shared by the tests
below: the files are written, and the metrics are measurements, not placeholders.
Only what is robustly true on this grid is asserted: with seeds 0, 1 and 2 alike (the
test runs seed 0), SGD at lr 1 without clipping diverges within 40 steps on the
transformer and clip_by_global_norm(1.0) does not, and a cluster of bad batches at lr
0.1 makes both models diverge without clipping and neither with it.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import _quality
from benchmarks.__main__ import parse

# Most tests read one module fixture (a tiny quality run): pytest-xdist's loadgroup sends
# them to one worker, so that it runs once.
pytestmark = pytest.mark.xdist_group("quality_benchmark")

TINY = _quality.QualityPlan(
    quick=True,
    steps=40,
    batch=2,
    context=8,
    seeds=(0,),
    lrs={"transformer": {"sgd": (0.1, 1.0)}, "lstm": {"sgd": (0.1,)}},
    spike_lrs={"transformer": {"sgd": (0.1,)}, "lstm": {"sgd": (0.1,)}},
    conditions=("clean", "cluster"),
    valid_sequences=8,
    only_methods=("no clipping", "clip_by_global_norm"),
    curve_points=10,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = _quality.run(TINY, log=lambda message: None, progress=False)
    results["meta"]["command"] = "tests/test_quality_benchmark.py"
    written = _quality.write(results, out, "quick_")
    return results, out, written


def _cell(results, model, method, lr, condition):
    (cell,) = [
        c
        for c in results["cells"]
        if (c["model"], c["method"], c["lr"], c["condition"]) == (model, method, lr, condition)
    ]
    return cell


def test_cli_runs_quality_only_when_named():
    assert parse(["--only", "quality", "--quick"]).only == ["quality"]
    assert parse([]).only is None  # the default sections stay clip, adaptive, donated


def test_methods_cover_the_catalog_and_the_update_clips():
    names = [m.name for m in _quality.methods()]
    from optaxclip import _catalog

    assert names[0] == "no clipping"
    # Every catalog entry that clips or skips; those that only record train as no clipping.
    clipping = {e.name for e in _catalog.ENTRIES if getattr(e, "clips", True)}
    assert clipping <= set(names)
    assert not (set(_catalog.NAMES) - clipping) & set(names)
    assert {"optax.clip_by_global_norm", "update: Adafactor-style RMS"} <= set(names)
    assert len(names) == len(set(names))


def test_corpus_is_the_standard_library_and_deterministic():
    a, b = _quality.load_corpus(), _quality.load_corpus()
    assert a.sha256 == b.sha256 and len(a.train) > 100_000
    assert len(a.valid) == pytest.approx(len(a.train) / 9, rel=0.01)
    assert 0 <= a.train.min() and a.train.max() < _quality.VOCAB


def test_files_are_written(tiny):
    results, out, written = tiny
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == [
        "quick_quality.json",
        "quick_quality.md",
        "quick_quality_curves_lstm_sgd.png",
        "quick_quality_curves_transformer_sgd.png",
        "quick_quality_lr.png",
    ]
    for name in names:
        assert (out / name).stat().st_size > 1000
    data = json.loads((out / "quick_quality.json").read_text())
    # 2 methods x (transformer: 2 clean lrs + 1 cluster; lstm: 1 clean + 1 cluster).
    assert len(data["cells"]) == 10 and len(data["groups"]) == 4
    md = (out / "quick_quality.md").read_text()
    assert "## Overview" in md and "## Every cell" in md
    assert "<!-- overview:start -->" in md and "<!-- overview:end -->" in md
    assert "| transformer / sgd / lr 1 / clean data | no clipping |" in md


def test_too_high_lr_diverges_without_clipping_only(tiny):
    results, _, _ = tiny
    bare = _cell(results, "transformer", "no clipping", 1.0, "clean")
    clipped = _cell(results, "transformer", "clip_by_global_norm", 1.0, "clean")
    assert bare["diverged"] == 1
    assert clipped["diverged"] == 0
    assert clipped["median_val"] < _quality.DIVERGED_ABOVE
    # The clip acted (this lr makes large gradients) and its rate is a real fraction.
    assert 0.0 < clipped["clip_rate"] <= 1.0
    assert bare["clip_rate"] is None and bare["skip_rate"] is None


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_clustered_bad_batches_diverge_without_clipping_only(tiny, model):
    results, _, _ = tiny
    bare = _cell(results, model, "no clipping", 0.1, "cluster")
    clipped = _cell(results, model, "clip_by_global_norm", 0.1, "cluster")
    assert bare["diverged"] == 1 and bare["survived"] == 0
    assert clipped["diverged"] == 0 and clipped["survived"] == 1
    # Paired with the same seed's clean run: what the bad batches cost.
    assert clipped["cost_vs_clean"] is not None and abs(clipped["cost_vs_clean"]) < 0.5


def test_metrics_are_measured(tiny):
    results, _, _ = tiny
    for c in results["cells"]:
        assert len(c["curve"]) == TINY.curve_points
    for model in ("transformer", "lstm"):
        curve = _cell(results, model, "clip_by_global_norm", 0.1, "clean")["curve"]
        # It learned: from about ln(97) (an untrained model guesses uniformly) down.
        assert abs(curve[0] - math.log(_quality.VOCAB)) < 0.5
        assert curve[-1] < curve[0] - 0.3
    for g in results["groups"]:
        assert g["compile_s"] > 0 and g["run_s"] > 0
    (ov,) = [o for o in results["overview"] if o["method"] == "clip_by_global_norm"]
    assert ov["runs"] == 5 and ov["spike_runs"] == 2 and ov["diverged"] == 0
