"""The notebooks run top to bottom on CPU, and each committed .ipynb matches its .py twin.

Every ``notebooks/*.py`` (a jupytext py:percent file) is covered: its ``.ipynb`` must carry
the same cells and no outputs, and that ``.ipynb`` is executed in a fresh kernel with
``FLAX_MHA_NOTEBOOK_SMALL=1`` (the notebooks' small-size parameter).
"""

import os
import pathlib
import re
import time

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# The oldest jax of pyproject.toml, which notebook 02 asks for with an accelerator plugin.
OLDEST_JAX = re.search(r'"jax>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
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


def _install_cell(py):
    """The source of the notebook's install cell (the one that reads FLAX_MHA_SOURCE)."""
    cells = [c.source for c in jupytext.read(py).cells if "FLAX_MHA_SOURCE =" in c.source]
    assert len(cells) == 1, f"{py.name} should have one install cell, but has {len(cells)}"
    return cells[0]


class _Dist:
    def __init__(self, name):
        self.metadata = {"Name": name}


def _run_install_cell(py, monkeypatch, tmp_path, *, source="", files=(), dists=()):
    """Runs the install cell as on a runtime without flax_mha; returns the pip commands."""
    import importlib.metadata
    import importlib.util
    import subprocess

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flax_mha" else find_spec(name, *a),
    )
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [_Dist(d) for d in dists])
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
    monkeypatch.setenv("FLAX_MHA_SOURCE", source)
    monkeypatch.chdir(tmp_path)
    for name in files:
        (tmp_path / name).write_bytes(b"")
    exec(compile(_install_cell(py), py.name, "exec"), {"__name__": "__main__"})  # noqa: S102
    return commands


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_install_cell_installs_the_source_it_is_given(py, monkeypatch, tmp_path):
    url = "git+https://example.invalid/me/flax_mha"
    (cmd,) = _run_install_cell(py, monkeypatch, tmp_path, source=url)
    assert cmd[-1] == url and cmd[1:4] == ["-m", "pip", "install"]
    wheel = "flax_mha-0.1.0-py3-none-any.whl"
    (cmd,) = _run_install_cell(py, monkeypatch, tmp_path, files=[wheel])
    assert cmd[-1] == wheel  # an uploaded wheel in the working folder, found by itself
    with pytest.raises(RuntimeError, match="upload the wheel built by `python -m build`"):
        (tmp_path / "empty").mkdir()
        _run_install_cell(py, monkeypatch, tmp_path / "empty")  # nothing to install


@pytest.mark.parametrize(
    ("dists", "jax_req"),
    [
        ((), None),  # a CPU runtime: jax as pip resolves it
        (("jax_cuda12_plugin", "jax-cuda12-pjrt"), "jax[cuda12]"),
        (("jax-cuda13-plugin", "numpy"), "jax[cuda13]"),  # beyond CUDA 12
        (("libtpu",), "jax[tpu]"),
    ],
)
def test_install_cell_asks_for_jax_with_the_runtimes_plugin(dists, jax_req, monkeypatch, tmp_path):
    (py,) = [p for p in NOTEBOOKS if p.stem.startswith("02_")]
    (cmd,) = _run_install_cell(py, monkeypatch, tmp_path, source="flax_mha.whl", dists=dists)
    asked = [a for a in cmd if a.startswith("jax")]
    if jax_req is None:
        assert asked == []
    else:
        assert asked == [f"{jax_req}>={OLDEST_JAX}"]


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
