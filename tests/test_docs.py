"""The documentation builds with warnings as errors, and every public name has an API entry.

The build is the README's docs command (``sphinx-build -W``, plus ``--keep-going`` so one
run lists every warning) into a temporary directory, so it never touches ``docs/_build``
and two runs cannot collide. It runs once, in one test: under pytest-xdist a fixture
shared by several tests would be built again by every worker that runs one of them. The
notebooks are rendered from their stored outputs, not executed (``tests/test_notebooks.py``
executes them), so the build takes seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import optaxclip
from benchmarks import _report

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD_TIMEOUT_S = 600  # a guard against hangs; the build takes well under a minute

# An API entry is the anchor autodoc gives a documented object: id="optaxclip.NAME".
_ENTRY = re.compile(r'id="optaxclip\.([A-Za-z_][A-Za-z0-9_]*)"')
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _sphinx_build(out: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [
            sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
            "-d", str(out / "doctrees"), str(DOCS), str(out / "html"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )


def test_docs_build_without_warnings_and_every_public_name_has_an_api_entry(tmp_path):
    done = _sphinx_build(tmp_path)
    assert "No module named sphinx" not in done.stderr, 'run pip install -e ".[dev]" first'
    assert done.returncode == 0, f"sphinx-build -W failed:\n{done.stderr[-6000:]}"

    html = tmp_path / "html"
    entries: dict[str, str] = {}
    for page in sorted((html / "api").glob("*.html")):
        for name in _ENTRY.findall(page.read_text(encoding="utf-8")):
            entries.setdefault(name, page.name)
    missing = sorted(set(optaxclip.__all__) - set(entries))
    assert not missing, (
        f"public names without an API entry: {missing}. Add one line per name, such as "
        "'.. autofunction:: optaxclip.NAME', to its family's page in docs/api/ "
        "(CONTRIBUTING.md, 'Documentation')."
    )
    private = sorted(set(entries) - set(optaxclip.__all__))
    assert not private, f"API entries for names outside optaxclip.__all__: {private}"
    for page in ("index", "examples", "api/index", "guides/performance"):
        assert (html / f"{page}.html").is_file(), f"{page}.html was not built"
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        outputs = [out for cell in cells for out in cell.get("outputs", [])]
        pictures = sum("image/png" in out.get("data", {}) for out in outputs)
        page = (html / "notebooks" / f"{notebook.stem}.html").read_text(encoding="utf-8")
        shown = page.count('src="../_images/')
        assert shown == pictures, f"{notebook.name}: {pictures} stored pictures, {shown} shown"


def test_benchmark_tables_are_included_not_pasted():
    results = ROOT / "benchmarks" / "results"
    rows = {
        line
        for table in results.glob("*.md")
        for line in table.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith("| optimizer |")
    }
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if "_build" in page.parts:
            continue
        text = page.read_text(encoding="utf-8")
        if page.name == "README.md":
            # The copies allowed: the summaries the benchmarks themselves write into the
            # README (test below).
            for block in README_BLOCKS:
                text = text.replace(_report.marked_block(text, block), "")
        pasted = rows & set(text.splitlines())
        assert not pasted, f"{page.relative_to(ROOT)} pastes benchmark rows: {sorted(pasted)[:3]}"
    performance = (DOCS / "guides" / "performance.md").read_text(encoding="utf-8")
    assert "{include} ../../benchmarks/results/results.md" in performance


@pytest.mark.parametrize(
    "page", ["README.md", "CONTRIBUTING.md"], ids=["README", "CONTRIBUTING"]
)
def test_relative_links_point_at_files_that_exist(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code are not links
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the page itself
        if not (ROOT / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{page} links to missing files: {broken}"


# README block -> the report that writes it (a full run of the benchmark named).
README_BLOCKS = {
    "overview": ("quality.md", "python -m benchmarks --only quality"),
    "cpu-summary": ("results.md", "python -m benchmarks"),
    "tpu-summary": ("tpu.md", "python -m benchmarks --platform tpu"),
}


@pytest.mark.parametrize("block", list(README_BLOCKS))
def test_readme_summaries_are_the_benchmarks_own(block):
    report_name, command = README_BLOCKS[block]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    report = (ROOT / "benchmarks" / "results" / report_name).read_text(encoding="utf-8")
    assert _report.marked_block(readme, block) == _report.marked_block(report, block), (
        f"README's {block} block differs from benchmarks/results/{report_name}: rerun "
        f"`{command}`, which rewrites both."
    )
