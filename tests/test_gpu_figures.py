"""What the CUDA compiler makes of optaxclip's rare branches and collectives (opt-in).

Runs only where JAX's CUDA plugin is installed, in an environment of its own (with it
JAX looks for a GPU at start-up, which the CPU tests must not do); no GPU is needed:

    python -m venv /tmp/cudaenv && /tmp/cudaenv/bin/pip install -e ".[dev,gpu]"
    /tmp/cudaenv/bin/python -m pytest -n 0 tests/test_gpu_figures.py

Elsewhere every test here is skipped. Each step is the donated ``chain(transform,
adamw)`` on 10 float32 leaves of 2M elements, compiled for the H100s that
``benchmarks/_gpu.py`` describes.

XLA:GPU turns a ``lax.cond`` whose branches hold only reductions and elementwise
operations into a select that runs both branches: every overflow rescue runs on every
step there (a second read of the gradient), and under FSDP its all-reduce with it. The
rows that show it are strict expected failures with the measured gap, as in
``test_tpu_figures.py``: a fix makes them pass, which fails the run until the mark goes.
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
# AGC measures every unit with three sums in one read, with no rescue branch (a cond
# per leaf made its compile time grow with the number of leaves).
WITHOUT_RESCUE = {"adaptive_grad_clip"}


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


RESCUE_RUNS_EVERY_STEP = pytest.mark.xfail(
    strict=True,
    reason="XLA:GPU compiles the rescue's lax.cond as a select (no conditional left); a "
    "sort in the branch keeps it, at the price of a host read of the predicate per step",
)


def _rows(names: list[str], mark: pytest.MarkDecorator) -> list:
    return [pytest.param(n, marks=[] if n in WITHOUT_RESCUE else [mark], id=n) for n in names]


@pytest.mark.parametrize("name", _rows(NAMES, RESCUE_RUNS_EVERY_STEP))
def test_rescue_stays_behind_a_conditional(name):
    conditionals = _compiled_text(name, "single").count(" conditional(")
    if name in WITHOUT_RESCUE:
        assert conditionals == 0
    else:
        assert conditionals >= 1, "the rescue runs on every step"


GLOBAL_NORM_NAMES = [n for n in NAMES if _tpu.counterpart(n) == "optax.clip_by_global_norm"]


TWO_SCALARS = pytest.mark.xfail(
    strict=True,
    reason="2 scalar all-reduces (the total, then the rescue's, which runs every step) vs "
    "Optax's 1; before 2026-12-03 one of f32[10] per-leaf sums and a scalar",
)


@pytest.mark.parametrize("name", _rows(GLOBAL_NORM_NAMES, TWO_SCALARS))
def test_fsdp_global_norm_all_reduces_one_scalar_as_optax(name):
    mine = [s for c in _common_collectives(name) for s in c["shapes"]]
    theirs = [s for c in _common_collectives("optax.clip_by_global_norm") for s in c["shapes"]]
    assert mine == theirs == ["f32[]"], (mine, theirs)
