"""The notebooks run top to bottom, and the committed copies are executed and Colab-ready.

Each notebook is executed with nbclient (kernel ``python3``) from a temporary copy, so the
committed file and its saved outputs are never touched. A notebook gets a time budget for all
of its cells together (kernel start-up excluded); a cell that would run past it is stopped and
the test fails, so a hang cannot stall the suite. To refresh the saved outputs after editing a
notebook, execute it in place with the same client, e.g.::

    import nbclient, nbformat
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": "notebooks"}}).execute()
    nbformat.write(nb, path)
"""

from __future__ import annotations

import pathlib
import shutil
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]

# Seconds for all cells of one notebook together. Each runs in well under a minute on a
# 2-core CPU; the budget is a guard against hangs, not a benchmark.
BUDGET_S = 300
COLAB_URL = "https://colab.research.google.com/github/optaxclip/optaxclip/blob/main/notebooks/"


class _Deadline:
    """nbclient ``timeout_func``: each cell may use what is left of the notebook's budget."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline: float | None = None

    def __call__(self, cell) -> int:
        now = time.monotonic()
        if self.deadline is None:  # the clock starts with the first cell, not the kernel
            self.deadline = now + self.seconds
        return max(1, int(self.deadline - now))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, f"expected the notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_without_error(path: pathlib.Path, tmp_path: pathlib.Path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout_func=_Deadline(BUDGET_S),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.monotonic()
    try:
        client.execute()  # raises CellExecutionError naming the failing cell
    except nbclient.exceptions.CellTimeoutError:
        pytest.fail(f"{path.name} ran past its {BUDGET_S} s budget")
    print(f"{path.name}: {time.monotonic() - start:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_is_colab_ready_and_executed(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    assert COLAB_URL + path.name in first_md.source, "the first markdown cell needs the badge"
    code = [c for c in nb.cells if c.cell_type == "code"]
    install = code[0].source
    assert '"google.colab" in sys.modules' in install and "%pip install" in install, (
        "the first code cell installs optaxclip only when running in Colab"
    )
    for cell in code:
        assert cell.get("execution_count"), "commit the notebook with its outputs (executed)"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"saved outputs contain an error: {errors[0].get('ename')}"
