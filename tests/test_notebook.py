"""notebooks/quickstart.ipynb runs top to bottom on the CPU, as a user would run it."""

from pathlib import Path

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_outputs_are_cleared_in_git():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_quickstart_runs_top_to_bottom(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The kernel imports this checkout's jaxpaged, installed or not.
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    text = "\n".join(output.get("text", "") for cell in notebook.cells
                     for output in cell.get("outputs", []) if cell.cell_type == "code")
    assert "platform: cpu" in text
    assert "Paris" in text  # greedy SmolLM2 on "The capital of France is"
    assert "best:  Jupiter" in text  # the multiple-choice scoring picks the right answer
    plots = [output for cell in notebook.cells for output in cell.get("outputs", [])
             if "image/png" in output.get("data", {})]
    assert len(plots) == 1
