"""--resume continues a run with its stored configuration; flags that contradict it are errors naming both."""

from __future__ import annotations

import json
import math

import pytest

from experiments import run as run_cli
from imbalance.model import ImbalanceClassifier

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--logger", "none", "--batch-size", "128"]


def resume_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_resume_uses_the_stored_configuration_and_rejects_contradicting_flags(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "runs" / "r"
    assert run_cli.main([*TINY, "--epochs", "1", "--lr", "0.002", "--loss", "weighted", "--out", str(run_dir)]) == 0
    resume = [*TINY, "--out", str(run_dir), "--resume"]

    assert "--loss focal (the run has weighted)" in resume_error([*resume, "--loss", "focal", "--epochs", "2"], capsys)
    # a flag given at its default value contradicts a stored non-default one all the same
    assert "--lr 0.001 (the run has 0.002)" in resume_error([*resume, "--lr", "0.001"], capsys)
    assert "--split" in resume_error([*resume, "--data-dir", str(tmp_path), "--split", "balanced"], capsys)

    # no --loss, no --lr: the run continues as it was configured, not with today's defaults; --epochs may grow
    lrs = {}
    original = ImbalanceClassifier.on_train_epoch_start

    def record_lr(module):
        lrs[module.current_epoch] = module.trainer.optimizers[0].param_groups[0]["lr"]
        original(module)

    monkeypatch.setattr(ImbalanceClassifier, "on_train_epoch_start", record_lr)
    assert run_cli.main([*resume, "--epochs", "3"]) == 0
    # the learning rate follows the cosine over the new 3 epochs, not the end (0) of the old 1-epoch schedule
    assert lrs == pytest.approx({e: 0.002 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2)})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["loss"] == "weighted" and summary["config"]["lr"] == 0.002
    assert summary["config"]["epochs"] == 3 and summary["epochs_completed"] == 3
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    assert "--epochs may only grow" in resume_error([*resume, "--epochs", "2"], capsys)


def test_a_run_with_a_relative_data_dir_resumes_from_another_directory(tmp_path, monkeypatch):
    from conftest import make_class_tree

    make_class_tree(tmp_path / "pets", {"Cat": 6, "Dog": 10})
    run_dir = tmp_path / "runs" / "p"
    photos = ["--data-dir", "pets", "--train-counts", "4,6", "--val-counts", "2,2", "--num-workers", "0"]
    assert run_cli.main([*TINY, *photos, "--epochs", "1", "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(tmp_path / "pets")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the same folder spelled another way is the same folder
    resumed = [*TINY, "--out", str(run_dir), "--resume", "--data-dir", str(tmp_path / "pets"), "--epochs", "2"]
    assert run_cli.main(resumed) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 2
