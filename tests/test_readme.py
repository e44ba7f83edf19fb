"""Every Python block in the README and the docs runs on its own, twice, and prints what it says.

The pages are README.md and every MyST page under docs/ (the guides hold most blocks).
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
DOCS = ROOT / "docs"
PAGES = [README, *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
TIMEOUT_S = 300  # a guard against hangs; each block takes seconds

_BLOCK = re.compile(r"```python\n(.*?)```(?:[ \t]*\n(?:[ \t]*\n)*```text\n(.*?)```)?", re.S)
_RUNS = 2
_SEPARATOR = "--- optaxclip docs block run ---"

# Runs the block (argv[1], from the page named by argv[2]) twice, each time in a fresh
# namespace, printing its output after a separator line.
_RUNNER = f"""
import contextlib, io, sys
code = compile(open(sys.argv[1]).read(), sys.argv[2], "exec")
for _ in range({_RUNS}):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {{"__name__": "__main__"}})
    print({_SEPARATOR!r})
    print(out.getvalue(), end="")
"""


def _blocks(page: pathlib.Path) -> list[tuple[str, str, str, str | None]]:
    """(id, page, code, expected output or None) for each Python block of a page."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT).as_posix()
    out = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        prose = re.sub(r"```.*?```", "", text[: match.start()], flags=re.S)
        headings = re.findall(r"^#+ (.+)$", prose, re.M) or [page.stem]
        slug = re.sub(r"[^a-z0-9]+", "-", headings[-1].lower()).strip("-")
        # Blocks inside a list item are indented with it.
        expected = None if match.group(2) is None else textwrap.dedent(match.group(2))
        block_id = f"{name}:{line}-{slug}"
        out.append((block_id, name, textwrap.dedent(match.group(1)), expected))
    return out


BLOCKS = [block for page in PAGES for block in _blocks(page)]


def test_the_readme_and_the_guides_have_python_blocks_to_run():
    assert any(page == "README.md" for _, page, _, _ in BLOCKS), "the quickstart"
    assert sum(page.startswith("docs/guides/") for _, page, _, _ in BLOCKS) >= 8


@pytest.mark.parametrize(
    ("page", "code", "expected"), [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS]
)
def test_block_runs_on_its_own_twice(page, code, expected, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(script), f"{page} block"],
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
