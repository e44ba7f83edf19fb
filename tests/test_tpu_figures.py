"""The TPU compiler's deterministic figures, against issue #14's targets (opt-in).

Runs only where libtpu is installed, in an environment of its own (libtpu must stay out
of the one the CPU tests use: with it JAX looks for a TPU at start-up):

    python -m venv /tmp/tpuenv && /tmp/tpuenv/bin/pip install -e ".[dev,tpu]"
    /tmp/tpuenv/bin/python -m pytest -n 0 tests/test_tpu_figures.py

Elsewhere every test here is skipped. Each optaxclip transform of the catalog is
compiled with adamw for a TPU v5e (no TPU needed, see ``benchmarks/_tpu.py``) on 10
float32 leaves of 2M elements, next to its Optax counterpart, and the figures the
compiler gives are held to the issue's targets: temp memory within 5% of Optax's, the
common path's HBM bytes (and, apart, the cost model's bytes, which count on-chip
traffic too) within 2%, and on 4 chips with FSDP-sharded leaves no more collectives
than Optax's, every one a scalar; one test compiles 600 small leaves with sgd, where
the layout of the global total once cost HBM traffic. Compile time is not
deterministic and is left to ``python -m benchmarks --platform tpu``.

The rows that miss a target today are marked ``xfail(strict=True)`` with the measured
gap as the reason: the file documents the gap, and a fix that closes one makes its row
pass, which fails the run until the mark is removed.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip(
        "libtpu is not installed (opt-in: pip install -e '.[tpu]' in an environment of its own)",
        allow_module_level=True,
    )

from benchmarks import _tpu  # noqa: E402

_tpu.prepare_environment()  # before JAX starts: a CPU process compiling for the topology

from optaxclip._catalog import NAMES  # noqa: E402

M = 1_000_000
OPTIMIZER, LEAVES, PARAMS = "adamw", 10, 20 * M
TEMP_BOUND, BYTES_BOUND = 1.05, 1.02
# Temp buffers are allotted in padded tiles: a few KiB either way is not a change of
# layout. 64 KiB is 0.08% of this tree's gradient.
TEMP_SLACK = 64 * 1024

# What the figures were when these marks were set (libtpu 0.0.42.1, JAX 0.10.2), by
# (figure, transform): optaxclip's / Optax's, as the full run of optaxclip fcee9e4 measured
# them (benchmarks/results/tpu.md), where the skip wrappers' bytes gap had closed;
# clip_by_value's and spike_aware_clip's figures as measured (2026-12-02) with the TPU's
# layouts of map_and_measure (big leaves' sums apart) and spike_aware_clip (norm first).
KNOWN_GAPS = {
    # 49.95 MiB before the one-read layout, 2.34 MiB while its rescue called the norm
    # engine twice, 1.72 MiB while big leaves had one three-output reduction on TPU too
    # (which cost 1.01x optax.clip's HBM bytes); 0 with the rare branch stubbed out.
    ("temp", "clip_by_value"): "3.88 MiB vs 0.00 MiB (optax.clip), all in the rare branch",
    ("temp", "clip_by_block_norm"): "8.55 MiB vs 3.41 MiB (optax.clip_by_block_rms)",
    ("temp", "clip_by_block_rms"): "8.55 MiB vs 3.41 MiB (optax.clip_by_block_rms)",
    ("temp", "adagc"): "8.52 MiB vs 3.41 MiB (optax.clip_by_block_rms)",
    ("bytes", "clip_by_block_norm"): "2.083x optax.clip_by_block_rms's",
    ("bytes", "clip_by_block_rms"): "2.083x optax.clip_by_block_rms's",
    ("bytes", "adaptive_grad_clip"): "1.662x optax.adaptive_grad_clip's",
    ("bytes", "adagc"): "2.076x optax.clip_by_block_rms's",
    # Its statistics need a reduction, which optax.clip does not make.
    ("collectives", "clip_by_value"): "1 all-reduce of scalar partial sums vs none for "
    "optax.clip",
    # 42.62 MiB, 2.235x and 3 all-reduces while it called the norm engine twice; 3.45
    # MiB, 1.745x, 1.443x HBM and 1 all-reduce while it measured in its first read
    # (which read every rms twice); 14.29 MiB while a rescue branch measured the clipped
    # values again (2026-12-03: now three scales in the read that clips).
    ("temp", "spike_aware_clip"): "1.81 MiB vs 0.00 MiB (optax.clip)",
    ("bytes", "spike_aware_clip"): "1.623x optax.clip's",
    ("collectives", "spike_aware_clip"): "2 all-reduces of scalars (the norm, then the "
    "clipped values' partial sums) vs none for optax.clip",
    # ("temp", "monitor") closed 2026-12-03 (3.23 MiB vs 2.86 MiB before): its norm's
    # rescue on TPU sums the leaves again tied to the total, not to each leaf's sum.
    # HBM bytes: every other transform reads and writes within 2% of its counterpart;
    # this one reads and writes a parameter-sized EMA that optax.clip has no
    # counterpart for (that alone is 1.286x here).
    ("hbm", "spike_aware_clip"): "1.300x optax.clip's",
}


@functools.cache
def _targets() -> dict:
    return _tpu.targets()


@functools.cache
def _figures(name: str, target: str, common: bool = False) -> dict:
    """The compiler's figures for ``name`` (a catalog entry or an Optax candidate)."""
    maker = _tpu.candidates(OPTIMIZER)[name]
    shapes = _tpu.tree_shapes(LEAVES, PARAMS)
    figures = _tpu.compile_step(maker(), shapes, _targets()[target], common=common, hlo=True)
    if common and figures["bytes_accessed"] is None:  # no rare branch: the step itself
        step = _figures(name, target)
        figures = dict(figures, bytes_accessed=step["bytes_accessed"], hbm_bytes=step["hbm_bytes"])
    return figures


def _rows(figure: str) -> list:
    """One parameter per catalog entry, marked xfail where :data:`KNOWN_GAPS` says so."""
    out = []
    for name in NAMES:
        gap = KNOWN_GAPS.get((figure, name))
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _rows("temp"))
def test_temp_memory_within_5pct_of_optax(name):
    mine = _figures(name, "single")["temp_bytes"]
    theirs = _figures(_tpu.counterpart(name), "single")["temp_bytes"]
    assert mine <= max(TEMP_BOUND * theirs, theirs + TEMP_SLACK), (
        f"{name}: {mine / 2**20:.2f} MiB vs {theirs / 2**20:.2f} MiB"
    )


@pytest.mark.parametrize("name", _rows("bytes"))
def test_common_path_bytes_within_2pct_of_optax(name):
    mine = _figures(name, "single", common=True)["bytes_accessed"]
    theirs = _figures(_tpu.counterpart(name), "single", common=True)["bytes_accessed"]
    assert mine <= BYTES_BOUND * theirs, f"{name}: {mine / theirs:.3f}x"


@pytest.mark.parametrize("name", _rows("hbm"))
def test_common_path_hbm_bytes_within_2pct_of_optax(name):
    mine = _figures(name, "single", common=True)["hbm_bytes"]
    theirs = _figures(_tpu.counterpart(name), "single", common=True)["hbm_bytes"]
    assert mine <= BYTES_BOUND * theirs, f"{name}: {mine / theirs:.3f}x"


@pytest.mark.parametrize(("optimizer", "arrays"), [("sgd", 3), ("adamw", 7)])
def test_hbm_bytes_of_an_optimizer_alone_are_its_arrays(optimizer, arrays):
    """sgd reads the gradient and the parameters and writes the parameters (3 arrays of
    the tree's size), adamw reads four and writes three (7): what ``hbm_bytes`` reads
    off the compiled step, where the cost model's bytes are several times more (it
    counts on-chip traffic too) and not even ordered (sgd alone "reads" more than sgd
    after ``optax.clip_by_block_rms``)."""
    shapes = _tpu.tree_shapes(LEAVES, PARAMS)
    step = _tpu.compile_step(_tpu.candidates(optimizer)["alone"](), shapes, _targets()["single"])
    tree_bytes = 4 * PARAMS
    assert arrays * tree_bytes <= step["hbm_bytes"] <= arrays * tree_bytes + 64 * 1024
    assert step["bytes_accessed"] > 1.3 * step["hbm_bytes"]


@pytest.mark.parametrize("name", _rows("collectives"))
def test_fsdp_collectives_no_more_than_optax_and_scalar(name):
    mine = _figures(name, "fsdp")["collectives"]
    theirs = _figures(_tpu.counterpart(name), "fsdp")["collectives"]
    assert mine["count"] <= theirs["count"], (mine, theirs)
    assert mine["all_scalar"], mine["shapes"]


GLOBAL_NORM_NAMES = [n for n in NAMES if _tpu.counterpart(n) == "optax.clip_by_global_norm"]


@pytest.mark.parametrize("name", GLOBAL_NORM_NAMES)
def test_fsdp_global_norm_all_reduces_one_scalar_as_optax(name):
    """A transform that measures only the global norm all-reduces what Optax's clip
    does: one scalar, the total, not one partial sum per leaf (which the TPU compiler
    combines 256 at a time: 8 all-reduces at 2,000 leaves before)."""
    mine = _figures(name, "fsdp")["collectives"]
    theirs = _figures("optax.clip_by_global_norm", "fsdp")["collectives"]
    assert mine["shapes"] == theirs["shapes"] == ["f32[]"], (mine, theirs)


def test_global_norm_of_many_small_leaves_reads_the_gradient_once_as_optax():
    """600 leaves of 1,000 with sgd, one chip: the common path of ``clip_by_global_norm``
    moves Optax's clip's HBM bytes (within 2%) and keeps no more temp memory. While the
    TPU layout summed the leaves' sums as a stacked vector, the compiler read some
    leaves from HBM for their reductions and again for the update: here 7.4 MiB
    against 6.9 (1.07x), with 12.3 MiB of temp memory (Optax: 55.4); at 2,000 leaves
    25.3 MiB against 22.9, with 9.3 MiB (Optax: 184.6)."""
    shapes = _tpu.tree_shapes(600, 600 * 1000)
    single = _targets()["single"]
    makers = _tpu.candidates("sgd")
    mine = _tpu.compile_step(makers["clip_by_global_norm"](), shapes, single, common=True)
    theirs = _tpu.compile_step(makers["optax.clip_by_global_norm"](), shapes, single)
    assert mine["hbm_bytes"] <= BYTES_BOUND * theirs["hbm_bytes"], (mine, theirs)
    assert mine["temp_bytes"] <= theirs["temp_bytes"], (mine, theirs)


def test_rare_branches_are_known():
    """Every lax.cond in a measured step is a rare branch the benchmark stubs out.

    A cond the table does not know would be counted in the common path's bytes as if
    every step ran both branches.
    """
    kept = {n: _figures(n, "single", common=True)["branches"].get("kept") for n in NAMES}
    assert not {n: k for n, k in kept.items() if k}, kept


def test_collectives_are_read_from_the_hlo():
    """The parser finds Optax's one all-reduce of a scalar on FSDP-sharded leaves."""
    c = _figures("optax.clip_by_global_norm", "fsdp")["collectives"]
    assert c["count"] == 1 and c["shapes"] == ["f32[]"] and c["ops"] == ["all-reduce"]
