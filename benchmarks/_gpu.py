"""``python -m benchmarks --platform gpu``: the CUDA compiler's figures, without a GPU.

JAX's CUDA plugin compiles ahead of time on a host with no GPU when it is given a
description of the target: ``get_topology_desc("h100", "cuda", target_config=...,
topology="1x1x4")`` hands out four H100 devices that can be lowered and compiled for but
not run on. :data:`TARGET_CONFIG` is that description: XLA's own H100 SXM
specification (``xla/backends/gpu/target_config/specs/h100_sxm.txtpb``) less the one
field that jaxlib 0.10.2 does not read.

The grid is the TPU benchmark's (:mod:`benchmarks._tpu`: every catalog transform before
the optimizer against its Optax counterpart, the donated step, compiled in turns) on
the trees a GPU user trains most (10 and 100 leaves of 20M parameters, adamw and sgd)
and 2,000 leaves of 1,000 (sgd),
with what the CUDA compiler reports: compile time, temp memory on one GPU, and the
collectives on four GPUs with FSDP-sharded leaves and replicated (data-parallel)
ones. The CUDA compiler has no cost model here (``cost_analysis()`` comes back empty);
the HBM column counts what the compiled module on one GPU reads and writes, from its
text (:func:`benchmarks._tpu.hbm_bytes`). The CUDA plugin must not be installed where the CPU tests
run (with it JAX looks for a GPU at start-up): ``pip install -e ".[dev,gpu]"`` in an
environment of its own. :func:`prepare_environment` must run before JAX is imported.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any

from benchmarks import _tpu

M = 1_000_000
TARGET_CONFIG = pathlib.Path(__file__).resolve().parent / "h100_sxm.txtpb"
TOPOLOGY = "1x1x4"
# The CPU runs the process; the CUDA plugin serves only as a compiler for TARGET_CONFIG.
ENVIRONMENT = {"JAX_PLATFORMS": "cpu"}


def cuda_available() -> bool:
    """Whether JAX's CUDA plugin (the compiler for ``--platform gpu``) is installed."""
    return importlib.util.find_spec("jax_cuda12_plugin") is not None


def prepare_environment() -> None:
    """Sets :data:`ENVIRONMENT` (keeping values the caller set); call before importing JAX."""
    _tpu.set_environment(ENVIRONMENT)


@dataclasses.dataclass
class GpuPlan:
    """What to compile and how often (the TPU plan's names; see :class:`_tpu.TpuPlan`)."""

    quick: bool
    # sgd at 2,000 leaves x 2M: leaves of 1,000 elements (bucketed), where the compile
    # time of many small leaves shows; only the TPU plan's names_large there.
    configs: tuple[tuple[str, int, int], ...] = (
        ("adamw", 10, 20 * M),
        ("sgd", 10, 20 * M),
        ("adamw", 100, 20 * M),
        ("sgd", 2000, 2 * M),
    )
    compile_repeats: dict[int, int] = dataclasses.field(default_factory=lambda: {10: 2})
    meshes: dict[str, tuple[tuple[str, int, int], ...]] = dataclasses.field(
        default_factory=lambda: {
            "fsdp": (("adamw", 10, 20 * M), ("adamw", 100, 20 * M)),
            "dp": (("adamw", 10, 20 * M),),
        }
    )

    @classmethod
    def make(cls, quick: bool) -> GpuPlan:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            configs=(("adamw", 10, 20 * M),),
            compile_repeats={10: 1},
            meshes={"fsdp": (("adamw", 10, 20 * M),)},
        )

    def meshes_for(self, config: tuple[str, int, int]) -> list[str]:
        """The four-GPU meshes compiled for this (optimizer, leaves, params)."""
        return [mesh for mesh, configs in self.meshes.items() if config in configs]

    def names_for(self, n_leaves: int, names: list[str]) -> list[str]:
        """The candidates compiled for a tree: all of them, but at 2,000 leaves only the
        TPU plan's ``names_large`` (one transform per engine and the counterparts)."""
        if n_leaves < 2000:
            return names
        return [n for n in names if n in _tpu.TpuPlan.names_large]


def targets(config: pathlib.Path = TARGET_CONFIG) -> dict[str, _tpu.Target]:
    """``single`` (one GPU), ``fsdp`` and ``dp`` (four GPUs) of the described H100s."""
    from jax.experimental import topologies

    description = config.read_text()
    devices = topologies.get_topology_desc(
        "h100", "cuda", target_config=description, topology=TOPOLOGY
    ).devices
    return _tpu.device_targets(list(devices))


def run(plan: GpuPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Measures the whole plan; returns the results (see :func:`markdown`). No
    common-path compiles: without a cost model they would measure nothing."""
    return {"configs": _tpu.measure_configs(plan, targets(), "gpu", log, common=False)}


# The bounds of issue #14 that the CUDA compiler can be judged on. It has no cost model;
# the bytes bound applies to the HBM traffic counted from the compiled module
# (_tpu.hbm_bytes, both branches of any conditional left).
BOUNDS = {
    "compile": _tpu.BOUNDS["compile"],
    "temp": _tpu.BOUNDS["temp"],
    "hbm": _tpu.BOUNDS["bytes"],
}


TEMP_FLOOR = 2**20  # bytes


def _mib2(n: float) -> str:
    return f"{n / 2**20:.2f}"


def temp_missed(e: dict[str, Any], row: dict[str, Any], tag: str) -> list[str]:
    """The temp target for one row: within the bound of the counterpart's, or at most
    :data:`TEMP_FLOOR` more. The CUDA compiler reports a few KiB where nothing is kept,
    and a ratio of two such amounts means nothing."""
    mine = e["candidates"][row["transform"]]["temp_bytes"]
    theirs = e["candidates"][row["counterpart"]]["temp_bytes"]
    if mine > BOUNDS["temp"] * theirs and mine - theirs > TEMP_FLOOR:
        return [f"{tag} {_mib2(mine)} vs {_mib2(theirs)} MiB"]
    return []


def hbm_missed(e: dict[str, Any], row: dict[str, Any], tag: str) -> list[str]:
    """The HBM target for one row: the module's HBM traffic within the bound of the
    counterpart's (rows of results measured before the figure was kept pass)."""
    mine = e["candidates"][row["transform"]].get("hbm_both_branches")
    theirs = e["candidates"][row["counterpart"]].get("hbm_both_branches")
    if mine is None or theirs is None or mine <= BOUNDS["hbm"] * theirs:
        return []
    return [f"{tag} {_tpu._mib(mine)} vs {_tpu._mib(theirs)} MiB"]


def targets_met(results: dict) -> list[dict[str, Any]]:
    """One line per target: the rows that miss it, or that all meet it."""
    return _tpu.judge(
        results,
        {
            f"compile (CPU time) <= {BOUNDS['compile']:.2f}x Optax's": _tpu.compile_missed,
            f"temp memory <= {BOUNDS['temp']:.2f}x Optax's (or at most 1 MiB more)": temp_missed,
            f"HBM traffic (compiled module) <= {BOUNDS['hbm']:.2f}x Optax's": hbm_missed,
            "collectives (FSDP, DP): no more than Optax's, all scalars": _tpu.collectives_missed,
        },
    )


def markdown(results: dict) -> str:
    """The tables: per row optaxclip's figure, Optax's and their ratio."""
    from benchmarks import _report

    x, mib, coll = _tpu._x, _tpu._mib, _tpu._coll
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# optaxclip on the CUDA compiler",
        "",
        f"`{meta['command']}`: jax-cuda12-plugin {m.get('cuda_plugin', '?')} compiling for "
        f"{m['target']} on {m['processor']} ({m['cpu_count']} cores, no GPU attached), "
        f"JAX {m['jax']}, Optax {m['optax']}, {m['date']}; "
        f"{meta['duration_s'] / 60:.1f} min; load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average'] or [])}.",
        "",
        "The donated step of chain(transform, optimizer) as in the TPU report, each "
        "transform built with the catalog's defaults, on float32 vector leaves of equal "
        "size. *Compile*: lower + compile, the median over turns; its ratio is the median "
        "of per-turn ratios of the CPU time of the compiling process and the tools it ran "
        "(ptxas). *Temp*: the compiler's temp buffers on one GPU, MiB (no ratio: where "
        "neither keeps anything the compiler still reports a few KiB). *FSDP* / *DP*: the "
        "collectives on 4 GPUs, count (result shapes), leaves sharded along their first "
        "axis (FSDP) or replicated (DP); rare-branch collectives counted apart. The CUDA "
        "compiler reports no cost model here. *HBM*: what the compiled module on one GPU "
        "reads from and writes to HBM, MiB, counted from its text as in the TPU report "
        "(both branches of any conditional XLA:GPU leaves in the step).",
        "",
    ]
    for e in results["configs"]:
        c = e["candidates"]
        alone = c["alone"]
        lines += [
            f"## {e['optimizer']}, {e['leaves']} leaves, {_tpu._p(e['params'])} parameters",
            "",
            f"The optimizer alone: compile {alone['compile_s']:.2f} s, temp "
            f"{mib(alone['temp_bytes'])} MiB; {e['compile_repeats']} compile turn(s)"
            + ("" if e["meshes"] else "; 4-GPU compiles not run for this tree")
            + ".",
            "",
            "| transform | Optax counterpart | compile optaxclip | Optax | CPU ratio | temp "
            "optaxclip | Optax | HBM optaxclip | Optax | FSDP optaxclip | Optax | DP "
            "optaxclip | Optax |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
        ]
        for row in e["rows"]:
            a, b = c[row["transform"]], c[row["counterpart"]]
            lines.append(
                f"| {row['transform']} | {row['counterpart']} | {a['compile_s']:.2f} | "
                f"{b['compile_s']:.2f} | {x(row['compile_cpu_ratio'])} | "
                f"{_mib2(a['temp_bytes'])} | {_mib2(b['temp_bytes'])} | "
                f"{mib(a.get('hbm_both_branches'))} | {mib(b.get('hbm_both_branches'))} | "
                f"{coll(a.get('fsdp', {}).get('collectives'))} | "
                f"{coll(b.get('fsdp', {}).get('collectives'))} | "
                f"{coll(a.get('dp', {}).get('collectives'))} | "
                f"{coll(b.get('dp', {}).get('collectives'))} |"
            )
        lines.append("")
    lines += _report.targets_and_notes(
        results.get("targets", []), meta.get("notes", []), "## Targets (issue #14)"
    )
    return "\n".join(lines)


def write(results: dict, out: Any, prefix: str) -> list[str]:
    """Writes ``<prefix>gpu.json`` and ``<prefix>gpu.md``; returns their paths."""
    from benchmarks import _report

    results["targets"] = targets_met(results)
    return _report.write_json_and_markdown(results, markdown(results), out, f"{prefix}gpu")


def machine_info() -> dict[str, Any]:
    """The host, JAX, the CUDA plugin and the target compiled for."""
    from benchmarks import _harness as H

    info = H.machine_info()
    try:
        info["cuda_plugin"] = importlib.metadata.version("jax-cuda12-plugin")
    except importlib.metadata.PackageNotFoundError:
        pass
    info["target"] = f"4 x NVIDIA H100 SXM ({TARGET_CONFIG.name}, topology {TOPOLOGY})"
    return info


def main(quick: bool, out: Any, command: str) -> int:
    """Runs the GPU section and writes its results (the caller prepared the environment)."""
    available = cuda_available()
    plan = GpuPlan.make(quick)
    machine = machine_info() if available else {}
    return _tpu.run_section(
        "gpu", available, plan, machine, lambda log: run(plan, log), write, markdown, out, command
    )
