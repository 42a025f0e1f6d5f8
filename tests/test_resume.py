"""--resume continues a run with its stored configuration; flags that contradict it are errors naming both."""

from __future__ import annotations

import json

import pytest

from experiments import run as run_cli

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--logger", "none", "--batch-size", "128"]


def resume_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_resume_uses_the_stored_configuration_and_rejects_contradicting_flags(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    assert run_cli.main([*TINY, "--epochs", "1", "--lr", "0.002", "--loss", "weighted", "--out", str(run_dir)]) == 0
    resume = [*TINY, "--out", str(run_dir), "--resume"]

    assert "--loss focal (the run has weighted)" in resume_error([*resume, "--loss", "focal", "--epochs", "2"], capsys)
    # a flag given at its default value contradicts a stored non-default one all the same
    assert "--lr 0.001 (the run has 0.002)" in resume_error([*resume, "--lr", "0.001"], capsys)
    assert "--split" in resume_error([*resume, "--data-dir", str(tmp_path), "--split", "balanced"], capsys)

    # no --loss, no --lr: the run continues as it was configured, not with today's defaults; --epochs may grow
    assert run_cli.main([*resume, "--epochs", "2"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["loss"] == "weighted" and summary["config"]["lr"] == 0.002
    assert summary["config"]["epochs"] == 2 and summary["epochs_completed"] == 2
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2
    assert "--epochs may only grow" in resume_error([*resume, "--epochs", "1"], capsys)
