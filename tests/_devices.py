"""Running a check script in a subprocess with simulated CPU devices.

JAX fixes its device count when it first initialises, and the pytest process already
has one device, so multi-device checks run in a subprocess that prints one JSON object
on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

# XLA:CPU's code generation at its lowest effort. It changes no HLO pass, so no result,
# compiled program, buffer or collective a test reads; it only makes compiling cheaper.
CHEAP_CODEGEN_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def simulated_devices_env(devices: int, *, cheap_codegen: bool = True) -> dict[str, str]:
    """The environment for a JAX process with ``devices`` simulated CPU devices.

    ``cheap_codegen`` lowers XLA's CPU code generation effort: compiling dominates such
    runs, and the runs a check compares use the same code either way.
    """
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={devices}"
    if cheap_codegen:
        flags += " " + CHEAP_CODEGEN_FLAGS
    env["XLA_FLAGS"] = flags
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    return env


def run_json_script(
    args: list[str], devices: int, timeout: float, *, cheap_codegen: bool = True
) -> dict:
    """Runs ``python *args`` on ``devices`` simulated devices; the JSON of its last line.

    Fails the calling test, with the end of the script's stderr, when it fails.
    """
    proc = subprocess.run(
        [sys.executable, *args],
        env=simulated_devices_env(devices, cheap_codegen=cheap_codegen),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def shared_across_xdist_workers(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    run: Callable[[], dict],
    wait_s: float,
) -> dict:
    """``run()``'s report, computed once per test session even under pytest-xdist.

    The first worker to get here runs it and writes the result to the session's shared
    temporary directory; the others wait up to ``wait_s`` seconds for that file.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return run()
    shared = tmp_path_factory.getbasetemp().parent
    result, lock = shared / f"{name}.json", shared / f"{name}.lock"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(1)
        if not result.exists():
            pytest.fail(f"no {result.name} from the xdist worker that ran the checks")
        return json.loads(result.read_text())
    data = run()
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(result)
    return data


def assert_check_ok(report: dict, name: str) -> None:
    """Fails with the check's own detail when ``report[name]`` is missing or not ok."""
    assert name in report, f"{name} was not reported; got {sorted(report)}"
    assert report[name]["ok"], report[name]["detail"]
