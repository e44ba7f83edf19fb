"""optaxclip across 2 processes: ``jax.distributed`` with 4 CPU devices in each, one
global mesh of 8, gives the answers of one process with 8 devices.

Each check runs ``tests/multiprocess_checks.py`` (which documents the program) three
times at once: two processes joined by ``jax.distributed.initialize`` on a loopback
coordinator, with gloo CPU collectives, and a single process with 8 simulated devices as
the reference. All three jit the same program over the same mesh: every transform of the
catalog, several steps, some leaves split over the mesh and others replicated, a spike
at one step and, for skip_nonfinite, a NaN on a shard only process 1 holds. Each writes
the shards it can address; this module puts the two processes' shards together,
compares them with the reference (relative tolerance 1e-6), and compares every replica
of each value (statistics, skip decisions, replicated leaves) across the 8 devices of
the two processes. The processes run once per module (under pytest-xdist, once per
session: the first worker to get here runs them and the others read its report).
"""

from __future__ import annotations

import pathlib
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from _devices import assert_check_ok, shared_across_xdist_workers, simulated_devices_env
from multidevice_checks import tree_mismatches
from multiprocess_checks import NAN_STEP, SPIKE_STEP

from optaxclip._catalog import BY_NAME, NAMES

# Its tests share one module fixture (a subprocess run): pytest-xdist's loadgroup
# sends them to one worker, which runs it once while the other worker goes on.
pytestmark = pytest.mark.xdist_group("multiprocess")

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_checks.py")
TIMEOUT_S = 600  # a guard against hangs; the three runs take about 15 s on 2 cores
NUM_PROCESSES = 2
SKIPS = ("skip_nonfinite", "skip_spikes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: pathlib.Path) -> str | None:
    """Runs the two processes and the reference; None, or why they failed."""
    port = _free_port()
    runs = {
        **{
            f"process{i}": (
                [str(i), str(NUM_PROCESSES), str(port)],
                simulated_devices_env(8 // NUM_PROCESSES),
            )
            for i in range(NUM_PROCESSES)
        },
        "single": (["single"], simulated_devices_env(8)),
    }
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    try:
        for tag, (args, env) in runs.items():
            stdout = (out / f"{tag}.stdout").open("w")
            stderr = (out / f"{tag}.stderr").open("w")
            logs += [stdout, stderr]
            procs[tag] = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(out), *args],
                env=env,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = {tag: p.poll() for tag, p in procs.items()}
            if any(c not in (None, 0) for c in codes.values()) or all(
                c == 0 for c in codes.values()
            ):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():  # a process left waiting for a failed peer, or a hang
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    failed = {tag: p.returncode for tag, p in procs.items() if p.returncode != 0}
    if not failed:
        return None
    tails = [
        f"--- {tag} (exit {procs[tag].returncode}):\n" + (out / f"{tag}.stderr").read_text()[-3000:]
        for tag in procs
    ]
    failure = f"runs failed (or were stopped at the {TIMEOUT_S} s guard): {failed}"
    return failure + "\n" + "\n".join(tails)


def _assemble(reports: list[dict], name: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """One transform's outputs as whole arrays from the shards of ``reports`` (its
    processes), and the problems: parts no process held, replicas that differ."""
    arrays, problems = {}, []
    for path in reports[0]["results"][name]:
        leaves = [r["results"][name][path] for r in reports]
        shape, dtype = leaves[0]["shape"], np.dtype(leaves[0]["dtype"])
        array = np.zeros(shape, dtype)
        covered = np.zeros(shape, bool)
        owner = np.full(shape, -1)
        for leaf in leaves:
            for shard in leaf["shards"]:
                region = tuple(slice(a, b) for a, b in shard["index"])
                where = f"{name}{path} on device {shard['mesh_position']}"
                if covered[region].any():
                    if not covered[region].all():
                        problems.append(f"{where}: overlaps another shard in part")
                        continue
                    diff = tree_mismatches(shard["data"], array[region], where)
                    if diff:
                        first = sorted({int(d) for d in owner[region].ravel()})
                        problems.append(
                            f"{diff[0]} (replica on process {shard['process']}: "
                            f"{shard['data'].ravel()[:8]}, on device(s) {first}: "
                            f"{array[region].ravel()[:8]})"
                        )
                else:
                    array[region] = shard["data"]
                    covered[region] = True
                    owner[region] = shard["mesh_position"]
        if not covered.all():
            problems.append(f"{name}{path}: {int((~covered).sum())} elements held by no device")
        arrays[path] = array
    return arrays, problems


def _local_decisions(report: dict, name: str) -> dict[str, list]:
    """What one process's devices say the skip wrapper decided, step by step."""
    out = {}
    for key in ("clipped", "clip_count"):
        shards = report["results"][name][f"['stats'][{key!r}]"]["shards"]
        values = {tuple(s["data"].tolist()) for s in shards}
        out[key] = sorted(values)  # one entry when its devices agree
    return out


def _compare(out: pathlib.Path) -> dict[str, list[str]]:
    procs = []
    for i in range(NUM_PROCESSES):
        with (out / f"process{i}.pkl").open("rb") as f:
            procs.append(pickle.load(f))
    with (out / "single.pkl").open("rb") as f:
        single = pickle.load(f)

    setup = []
    if [p["process_index"] for p in procs] != list(range(NUM_PROCESSES)):
        setup.append(f"process indices {[p['process_index'] for p in procs]}")
    for p in procs:
        if p["process_count"] != NUM_PROCESSES:
            setup.append(f"process {p['process_index']} saw {p['process_count']} processes")
        if sorted(set(p["mesh_processes"])) != list(range(NUM_PROCESSES)):
            setup.append(f"the mesh's devices belong to processes {p['mesh_processes']}")
        if any(p["inputs_fully_addressable"].values()):
            setup.append(f"inputs held whole by one process: {p['inputs_fully_addressable']}")
        if p["nan_processes"] != [1]:
            setup.append(f"the NaN is held by processes {p['nan_processes']}, not just 1")
        for name in NAMES:
            held = {s["process"] for leaf in p["results"][name].values() for s in leaf["shards"]}
            if held != {p["process_index"]}:
                setup.append(f"process {p['process_index']} wrote shards of processes {held}")
    results = {"setup": setup}

    for name in NAMES:
        got, replicas = _assemble(procs, name)
        want, _ = _assemble([single], name)
        problems = tree_mismatches(got, want, name)
        ref_count = want["['stats']['clip_count']"]
        if ref_count[-1] == 0 and BY_NAME[name].clips:  # monitor only records
            problems.append(f"{name} never clipped: the comparison would prove little")
        results[f"match/{name}"] = problems
        results[f"replicas/{name}"] = replicas

    for name in SKIPS:
        views = [_local_decisions(p, name) for p in procs]
        want, _ = _assemble([single], name)
        clipped = want["['stats']['clipped']"].tolist()
        problems = []
        if any(len(v) != 1 for view in views for v in view.values()):
            problems.append(f"the devices of one process disagree: {views}")
        if views[0] != views[-1]:
            problems.append(f"process 0 decided {views[0]}, process 1 {views[-1]}")
        if views[0]["clipped"] != [tuple(clipped)]:
            problems.append(f"decided {views[0]['clipped']}, one process {clipped}")
        # The reference's decisions are the ones these inputs call for.
        expected_step = NAN_STEP if name == "skip_nonfinite" else SPIKE_STEP
        if not clipped[expected_step]:
            problems.append(f"the reference did not skip step {expected_step}: {clipped}")
        if name == "skip_nonfinite" and sum(clipped) != 1:
            problems.append(f"the reference skipped steps {clipped}, only the NaN's expected")
        results[f"decisions/{name}"] = problems
    return results


def _run_checks(out: pathlib.Path) -> dict[str, Any]:
    start = time.monotonic()
    failure = _run_workers(out)
    if failure is not None:
        return {"setup": {"ok": False, "detail": failure}}
    report = {k: {"ok": not v, "detail": "\n".join(v)} for k, v in _compare(out).items()}
    report["timing"] = {"ok": True, "detail": f"{time.monotonic() - start:.1f}s"}
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return shared_across_xdist_workers(
        tmp_path_factory,
        "multiprocess",
        lambda: _run_checks(tmp_path_factory.mktemp("multiprocess")),
        TIMEOUT_S + 60,
    )


def _assert_ok(report: dict, name: str) -> None:
    assert report["setup"]["ok"], report["setup"]["detail"]
    assert_check_ok(report, name)


def test_two_processes_each_hold_half_of_the_mesh_and_one_holds_the_nan(report):
    _assert_ok(report, "setup")


@pytest.mark.parametrize("transform", NAMES)
def test_two_processes_match_one_process_with_8_devices(report, transform):
    # Updates and statistics at every step, and the final state.
    _assert_ok(report, f"match/{transform}")


@pytest.mark.parametrize("transform", NAMES)
def test_every_replica_agrees_across_processes(report, transform):
    # Statistics, adaptive state and replicated leaves: equal on all 8 devices.
    _assert_ok(report, f"replicas/{transform}")


@pytest.mark.parametrize("transform", SKIPS)
def test_skip_decisions_agree_on_every_process(report, transform):
    # skip_nonfinite: a NaN only process 1 holds; skip_spikes: the spike step.
    _assert_ok(report, f"decisions/{transform}")
