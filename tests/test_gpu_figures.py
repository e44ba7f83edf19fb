"""What the CUDA compiler makes of optaxclip's rare branches and collectives (opt-in).

Runs only where JAX's CUDA plugin is installed, in an environment of its own (with it
JAX looks for a GPU at start-up, which the CPU tests must not do); no GPU is needed:

    python -m venv /tmp/cudaenv && /tmp/cudaenv/bin/pip install -e ".[dev,gpu]"
    /tmp/cudaenv/bin/python -m pytest -n 0 tests/test_gpu_figures.py

Elsewhere every test here is skipped. Each step is the donated ``chain(transform,
adamw)`` on 10 float32 leaves of 2M elements, compiled for the H100s that
``benchmarks/_gpu.py`` describes.

XLA:GPU turns a ``lax.cond`` whose branches hold only reductions and elementwise
operations into a select that runs both branches, so a rescue branch would read the
gradient a second time on every step. The norm engine's GPU layout has none (every leaf
summed at three scales in one read); the rows that still read more than Optax's are
strict expected failures with the measured gap, as in ``test_tpu_figures.py``: a fix
makes them pass, which fails the run until the mark goes.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

if importlib.util.find_spec("jax_cuda12_plugin") is None:
    pytest.skip(
        "the CUDA plugin is not installed (opt-in: pip install -e '.[gpu]' in an "
        "environment of its own)",
        allow_module_level=True,
    )

from benchmarks import _gpu, _tpu  # noqa: E402

_gpu.prepare_environment()  # before JAX starts: a CPU process compiling for the GPUs

from optaxclip._catalog import NAMES  # noqa: E402

M = 1_000_000
OPTIMIZER, LEAVES, PARAMS = "adamw", 10, 20 * M
# Within this fraction of the counterpart's HBM bytes: the same reads and writes.
HBM_SLACK = 0.001


@functools.cache
def _targets() -> dict:
    return _gpu.targets()


@functools.cache
def _compiled_text(name: str, target: str) -> str:
    """The compiled module of ``name``'s donated step, as text."""
    tx = _tpu.candidates(OPTIMIZER)[name]()
    shapes = _tpu.tree_shapes(LEAVES, PARAMS)
    return _tpu.compile_step(tx, shapes, _targets()[target], text=True)["text"]


def _common_collectives(name: str) -> list[dict]:
    return [c for c in _tpu.collectives(_compiled_text(name, "fsdp")) if not c["rare"]]


# Measured 2026-12-04 (MiB of HBM traffic, optaxclip vs optax.clip, whose clip fuses
# into adamw's update: it reads the gradient once).
READS_MORE = {
    "clip_by_value": "611.1 vs 534.1 MiB: one more read of the gradient (76.3 MiB), for "
    "its statistics (norms before and after, count), which optax.clip does not keep",
    "spike_aware_clip": "763.8 vs 534.1 MiB: its EMA (read and written, 152.6 MiB) and "
    "the norm's own read of the gradient, taken before the clip (992.6 while it measured "
    "in its first read, the layout XLA:CPU keeps)",
}


def _rows(names: list[str]) -> list:
    return [
        pytest.param(
            n,
            marks=[pytest.mark.xfail(strict=True, reason=READS_MORE[n])] if n in READS_MORE else [],
            id=n,
        )
        for n in names
    ]


@pytest.mark.parametrize("name", _rows(NAMES))
def test_step_moves_the_hbm_bytes_of_optax(name):
    # No second read of the gradient: the module's HBM traffic (reads and writes of the
    # entry computation, as _tpu.hbm_bytes counts them) is the Optax counterpart's.
    mine = _tpu.hbm_bytes(_compiled_text(name, "single"))
    theirs = _tpu.hbm_bytes(_compiled_text(_tpu.counterpart(name), "single"))
    assert mine <= theirs * (1 + HBM_SLACK), (mine / 2**20, theirs / 2**20)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in READS_MORE])
def test_no_conditional_is_left_in_the_step(name):
    assert _compiled_text(name, "single").count(" conditional(") == 0


def _counterpart_is(optax_name: str) -> list[str]:
    return [n for n in NAMES if _tpu.counterpart(n) == optax_name]


@pytest.mark.parametrize("name", _counterpart_is("optax.clip_by_global_norm"))
def test_fsdp_global_norm_all_reduces_once_as_optax(name):
    # One all-reduce, as Optax's clip, of the three sums of squares (plain, scaled down,
    # scaled up) where Optax's carries one: a constant 12 bytes, whatever the leaves.
    mine = [s for c in _common_collectives(name) for s in c["shapes"]]
    theirs = [s for c in _common_collectives("optax.clip_by_global_norm") for s in c["shapes"]]
    assert (mine, theirs) == (["f32[3]"], ["f32[]"])


@pytest.mark.parametrize("name", _counterpart_is("optax.clip_by_block_rms"))
def test_fsdp_per_leaf_norms_all_reduce_once_as_optax(name):
    # One all-reduce, as Optax's per-block clip, of three sums per leaf where Optax's
    # carries one.
    mine = [s for c in _common_collectives(name) for s in c["shapes"]]
    theirs = [s for c in _common_collectives("optax.clip_by_block_rms") for s in c["shapes"]]
    assert (mine, theirs) == ([f"f32[{3 * LEAVES}]"], [f"f32[{LEAVES}]"])
