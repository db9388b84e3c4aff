"""Notebooks run headless, so they never rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["calibration.ipynb"])
def test_notebook_executes(name, traces_dir, monkeypatch):
    monkeypatch.setenv("MASLAT_TRACES_DIR", str(traces_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # fit, CDFs, queues
    assert os.environ["MASLAT_TRACES_DIR"] == str(traces_dir)
