"""The benchmark entry point answers --help without running anything heavy."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_help_lists_the_quick_option():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    assert "--quick" in out.stdout and "python -m benchmarks" in out.stdout
