"""Every Python block in the README runs on its own, twice, and prints what it says.

A reader copies one block into a fresh file or notebook cell and runs it, maybe twice:
each block runs here in a fresh interpreter (so it cannot lean on an earlier block),
twice in a row (so it cannot leave behind something that breaks the second run, such as
a checkpoint directory), in an empty working directory. Where a ```text block follows
it, that is the output both runs must print.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300  # a guard against hangs; each block takes seconds

_BLOCK = re.compile(r"```python\n(.*?)```(?:[ \t]*\n(?:[ \t]*\n)*```text\n(.*?)```)?", re.S)
_RUNS = 2
_SEPARATOR = "--- optaxclip README run ---"

# Runs the block (argv[1]) twice, each time in a fresh namespace, printing its output
# after a separator line.
_RUNNER = f"""
import contextlib, io, sys
code = compile(open(sys.argv[1]).read(), "README.md block", "exec")
for _ in range({_RUNS}):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {{"__name__": "__main__"}})
    print({_SEPARATOR!r})
    print(out.getvalue(), end="")
"""


def _blocks() -> list[tuple[str, str, str | None]]:
    """(id, code, expected output or None) for each Python block of the README."""
    text = README.read_text()
    out = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        prose = re.sub(r"```.*?```", "", text[: match.start()], flags=re.S)
        heading = re.findall(r"^#+ (.+)$", prose, re.M)[-1]
        slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
        # Blocks inside a list item are indented with it.
        expected = None if match.group(2) is None else textwrap.dedent(match.group(2))
        out.append((f"line{line}-{slug}", textwrap.dedent(match.group(1)), expected))
    return out


BLOCKS = _blocks()


def test_the_readme_has_python_blocks_to_run():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize(("code", "expected"), [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_block_runs_on_its_own_twice(code, expected, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = done.stdout.split(_SEPARATOR + "\n")[1:]
    assert len(runs) == _RUNS
    if expected is not None:
        for output in runs:
            assert output.rstrip() == expected.strip()
