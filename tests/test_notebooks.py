"""The notebooks run top to bottom on CPU, and each committed .ipynb matches its .py twin.

Every ``notebooks/*.py`` (a jupytext py:percent file) is covered: its ``.ipynb`` must carry
the same cells and no outputs, and that ``.ipynb`` is executed in a fresh kernel with
``FLAX_MHA_NOTEBOOK_SMALL=1`` (the notebooks' small-size parameter).
"""

import os
import pathlib
import time

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.py"))
IDS = [p.stem for p in NOTEBOOKS]
#: Wall-clock budget of one notebook, all cells together (kernel start excluded).
NOTEBOOK_TIMEOUT_S = 300
# --update keeps the cell ids of the existing .ipynb (small diffs) but also its outputs.
REGENERATE = "regenerate it with `jupytext --update --to ipynb notebooks/{py}`"
CLEAR = "regenerate it without outputs with `jupytext --to ipynb notebooks/{py}`"


def _cells(nb):
    """What must agree between the twins: each cell's type, source and tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks/*.py found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_ipynb_matches_its_py_twin_and_has_no_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: " + REGENERATE.format(py=py.name)
    committed = nbformat.read(ipynb, as_version=4)
    nbformat.validate(committed)
    assert _cells(committed) == _cells(jupytext.read(py)), (
        f"{ipynb.name} differs from {py.name}: " + REGENERATE.format(py=py.name)
    )
    for i, cell in enumerate(committed.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{ipynb.name} cell {i} has outputs; commit notebooks without outputs: "
                + CLEAR.format(py=py.name)
            )


@pytest.mark.slow
@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(py, tmp_path, monkeypatch):
    # The kernel inherits this environment: CPU only, small sizes, JAX strict about ranks.
    monkeypatch.setenv("FLAX_MHA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_NUMPY_RANK_PROMOTION", "raise")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebook picks inline itself under IPython
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's path-migration warning
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        # nbclient's timeout is per cell; give each cell what is left of the notebook's budget.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises nbclient.exceptions.CellExecutionError if any cell raises
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert os.listdir(tmp_path) == [], "notebooks should write only to temporary folders"
