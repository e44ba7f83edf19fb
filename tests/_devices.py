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

import pytest


def simulated_devices_env(devices: int, *, cheap_codegen: bool = True) -> dict[str, str]:
    """The environment for a JAX process with ``devices`` simulated CPU devices.

    ``cheap_codegen`` lowers XLA's CPU code generation effort: compiling dominates such
    runs, and the runs a check compares use the same code either way.
    """
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={devices}"
    if cheap_codegen:
        flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
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
