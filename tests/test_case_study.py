"""The case-study runner: dry run, a tiny grid end to end, resuming after a failed cell."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from experiments import case_study

GRID = Path(__file__).resolve().parents[1] / "experiments" / "case_study.yaml"


def test_dry_run_lists_every_cell_of_the_repository_grid(capsys):
    assert case_study.main(["--grid", str(GRID), "--data-dir", "somewhere", "--scale", "0.2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    grid = yaml.safe_load(GRID.read_text())
    trained = [c for c in grid["cells"] if "runs_of" not in c]
    for cell in trained:
        assert f"  {cell['id']}  seed 0" in out, cell["id"]
    expected = sum(cell.get("seeds", grid["seeds"]) for cell in trained)
    assert f"{expected} runs, {expected} to do" in out
    assert "--split imbalanced-2 --loss focal --gamma 2 --alpha 0.5" in out


def test_only_filters_and_bad_grids_are_errors(tmp_path, capsys):
    assert (
        case_study.main(["--grid", str(GRID), "--data-dir", "d", "--only", "balanced/*", "--seeds", "1", "--dry-run"])
        == 0
    )
    assert "3 runs" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells:\n  - {id: a, data: d, method: m, flags: {los: ce}}\n")
    with pytest.raises(SystemExit):
        case_study.main(["--grid", str(bad), "--dry-run"])
    assert "unknown flags ['los']" in capsys.readouterr().err


def write_grid(path: Path, second_flags: dict) -> Path:
    grid = {
        "name": "tiny",
        "defaults": {"backbone": "test_resnet", "epochs": 1, "image_size": 32},
        "seeds": 2,
        "cells": [
            {
                "id": "digits/ce",
                "data": "digits",
                "method": "plain CE",
                "flags": {"loss": "ce"},
                "lecture": {"f1": 0.5, "cats": 10, "dogs": 20},
            },
            {"id": "digits/weighted", "data": "digits", "method": "weighted", "flags": second_flags},
        ],
    }
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_tabulates(tmp_path, capsys):
    # the second cell fails (no network for --pretrained); the first must not be retrained on the rerun
    grid = write_grid(tmp_path / "grid.yaml", {"loss": "weighted", "pretrained": True})
    assert case_study.main(["--grid", str(grid), "--results", "res"]) == 1  # the table is written, the exit says
    out = capsys.readouterr().out
    assert out.count("failed: digits/weighted") == 2
    first = tmp_path / "res" / "runs" / "digits" / "ce"
    stamps = {p: p.stat().st_mtime_ns for p in first.glob("seed*/summary.json")}
    assert len(stamps) == 2
    write_grid(grid, {"loss": "weighted"})
    assert case_study.main(["--grid", str(grid), "--results", "res"]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in first.glob("seed*/summary.json")} == stamps
    rows = list(csv.DictReader((tmp_path / "res" / "table.csv").open()))
    assert [r["id"] for r in rows] == ["digits/ce", "digits/weighted"]
    assert all(r["seeds"] == "2" and r["failed"] == "0" for r in rows)
    assert all(0 <= float(r["f1_mean"]) <= 1 and float(r["f1_std"]) >= 0 for r in rows)
    table = (tmp_path / "res" / "table.md").read_text()
    assert "± " in table and "| digits | plain CE | 2 |" in table and "| 0.5 | 10 / 20 |" in table
    assert (tmp_path / "res" / "table.png").stat().st_size > 1000


def test_sweep_file_lists_every_trained_cell():
    sweep = yaml.safe_load((GRID.parent / "sweeps" / "case_study.yaml").read_text())
    grid = yaml.safe_load(GRID.read_text())
    assert sweep["parameters"]["case-study-cell"]["values"] == [c["id"] for c in grid["cells"] if "runs_of" not in c]
    assert sweep["method"] == "grid" and "experiments.run" in sweep["command"]


def test_case_study_cell_flags_reach_the_run_config():
    from experiments.run import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["--case-study-cell", "imbalanced-2/focal", "--grid", str(GRID), "--data-dir", "d", "--epochs", "2"]
    )
    cfg = config_from_args(args, parser)
    assert (cfg.split, cfg.loss, cfg.gamma, cfg.alpha) == ("imbalanced-2", "focal", 2, (0.5,))
    assert cfg.epochs == 2 and cfg.wandb_group == "imbalanced-2/focal"  # the command line wins
