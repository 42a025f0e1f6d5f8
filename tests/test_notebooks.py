"""The notebooks are stored without outputs and run top to bottom."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
    assert [n.stem for n in NOTEBOOKS] == ["01_losses", "02_metrics", "03_case_study"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs (make strip)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    if path.stem == "03_case_study":  # give it a run to look at, trained here rather than in the kernel
        from experiments import run as run_cli

        run_cli.main(
            ["--backbone", "test_resnet", "--image-size", "32", "--epochs", "2", "--logger", "none", "--out", "nbrun"]
        )
        monkeypatch.setenv("IMBALANCE_RUN_DIR", str(tmp_path / "nbrun"))
    started = time.time()
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    print(f"{path.name} ran in {time.time() - started:.1f} s")
