"""Hostile runs: a folder two runs want, a rerun into a finished folder, options that fail after files were
written, signals mid-epoch, exit codes, NaN losses and outputs, and broken checkpoints given to --resume.

Every error must reach the user as one `error: ...` line (never a traceback) with an honest exit code, and
no run may leave a half-made folder, a stale lock or a process behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from experiments import case_study
from experiments import run as run_cli
from imbalance import model as model_lib
from imbalance.io import RunLock
from imbalance.metrics import best_f1_threshold, confusion_metrics

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--logger", "none", "--num-workers", "0"]
# the embedded digits: 1,212 training digits after the default dev split, 10 training steps per epoch
FAST = [*TINY, "--batch-size", "128"]


def error_of(args: list[str], capsys, code: int = 2) -> str:
    """Run experiments.run in this process; it must exit `code` with exactly one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main(args)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@contextlib.contextmanager
def started(args: list[str], log: Path):
    """experiments.run in its own process group, killed as a group whatever happens in the test."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C handler: the
            # run must see Ctrl-C as a terminal would send it, whatever launched the tests
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) too early:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def rows(path: Path) -> int:
    return len(read_csv(path)) if path.is_file() else 0


def no_lock_left(run_dir: Path) -> bool:
    return not (run_dir / ".lock").exists() and not os.environ.get("IMBALANCE_RUN_LOCK")


class Wrapped(nn.Module):
    """A timm backbone whose outputs turn NaN: from the `after`-th training forward on, or only in eval mode."""

    def __init__(self, inner: nn.Module, after: int | None = 0, eval_only: bool = False, value=float("nan")):
        super().__init__()
        self.inner, self.after, self.eval_only, self.value, self.calls = inner, after, eval_only, value, 0
        self.pretrained_cfg = inner.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.inner.get_classifier()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.inner(images)
        if self.training:
            self.calls += 1
            broken = not self.eval_only and self.after is not None and self.calls > self.after
        else:
            broken = self.eval_only
        return out * self.value if broken else out


def break_backbone(monkeypatch, **kwargs) -> None:
    real = model_lib.create_backbone
    monkeypatch.setattr("imbalance.train.create_backbone", lambda *a, **k: Wrapped(real(*a, **k), **kwargs))


# 1. a run folder has one owner; a finished or started run is never overwritten silently


# 17 s; the refusal of a folder in use is also tested, faster, by test_a_lock_held_by_a_live_process_or_left_by_a_dead_one
@pytest.mark.extended
def test_a_second_run_on_a_running_folder_is_refused_and_the_first_finishes(tmp_path, capsys):
    log = tmp_path / "first.log"
    with started([*FAST, "--epochs", "3", "--out", "shared"], log) as first:
        wait_for(lambda: (tmp_path / "shared" / ".lock").is_file(), first, log)
        message = error_of([*FAST, "--epochs", "1", "--out", "shared"], capsys)
        assert "shared is in use by another run" in message and f"pid {first.pid} " in message
        assert first.wait(timeout=240) == 0, log.read_text()[-3000:]
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["config"]["epochs"] == 3  # the first run's, unmixed
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "shared" / "metrics.csv")] == [0, 1, 2]
    assert no_lock_left(tmp_path / "shared")


def test_a_lock_held_by_a_live_process_or_left_by_a_dead_one(tmp_path, capsys):
    held = RunLock(tmp_path / "held")
    held.acquire()  # this process, as another run would
    try:
        message = error_of([*FAST, "--epochs", "1", "--out", "held"], capsys)
        assert f"held is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in message
    finally:
        held.release()
    assert not (tmp_path / "held").joinpath("config.json").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "stale").mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "since": "yesterday"}
    (tmp_path / "stale" / ".lock").write_text(json.dumps(record))
    assert run_cli.main([*FAST, "--epochs", "1", "--out", "stale"]) == 0
    out = capsys.readouterr().out
    assert f"took over the stale lock of stale (pid {dead.pid} on" in out and "no longer running" in out
    assert (tmp_path / "stale" / "summary.json").is_file() and no_lock_left(tmp_path / "stale")


def test_a_folder_holding_a_run_needs_overwrite_or_resume(tmp_path, capsys):
    assert run_cli.main([*FAST, "--epochs", "2", "--out", "r"]) == 0
    summary = tmp_path / "r" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    message = error_of([*FAST, "--epochs", "1", "--out", "r"], capsys)
    assert "r already holds a finished run" in message and "--resume" in message and "--overwrite" in message
    assert summary.stat().st_mtime_ns == stamp and len(read_csv(tmp_path / "r" / "metrics.csv")) == 2

    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")
    assert "started already holds a started run that completed no epoch" in error_of(
        [*FAST, "--out", "started"], capsys
    )
    assert "give only one" in error_of([*FAST, "--out", "r", "--resume", "--overwrite"], capsys)

    (tmp_path / "r" / "notes.txt").write_text("mine")  # not a run file: --overwrite keeps it
    (tmp_path / "r" / "checkpoints" / "epoch=7.ckpt").write_text("old")
    assert run_cli.main([*FAST, "--epochs", "1", "--out", "r", "--overwrite"]) == 0
    assert "deleted the earlier run's files" in capsys.readouterr().out
    assert [r["epoch"] for r in read_csv(tmp_path / "r" / "metrics.csv")] == ["0"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    stored = json.loads((tmp_path / "r" / "config.json").read_text())
    assert stored["epochs"] == 1 and stored["overwrite"] is False  # an action, not part of the run
    assert no_lock_left(tmp_path / "r")


@pytest.mark.slow
def test_ddp_workers_share_their_parents_lock(tmp_path):
    log = tmp_path / "ddp.log"
    args = [*TINY, "--batch-size", "64", "--epochs", "1", "--accelerator", "cpu", "--devices", "2", "--out", "ddp"]
    with started(args, log) as ddp:
        assert ddp.wait(timeout=400) == 0, log.read_text()[-3000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["epochs_completed"] == 1
    assert no_lock_left(tmp_path / "ddp")


# 2. a failed start leaves no half-made run folder


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--weight-decay", "-1"], "weight"),  # the optimiser (or validate) rejects these
        (["--lr", "nan"], "lr"),
        (["--precision", "bogus"], "bogus"),
        pytest.param(  # only Lightning's Trainer knows this one
            ["--accelerator", "mps"],
            "MPSAccelerator` can not run",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS"),
        ),
        (["--loss", "autobalance", "--autobalance-lr", "-1"], "autobalance-lr"),
    ],
)
def test_a_rejected_option_writes_nothing(tmp_path, capsys, bad, says):
    assert says in error_of([*FAST, "--epochs", "1", *bad, "--out", "runs/bad"], capsys)
    assert not (tmp_path / "runs").exists()


def test_a_run_failing_before_its_first_epoch_removes_what_it_made(tmp_path, capsys, monkeypatch):
    break_backbone(monkeypatch, after=0)
    assert "no epoch had completed, so fresh was removed" in error_of([*FAST, "--out", "fresh"], capsys)
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "cell").mkdir()  # a case study's run folder holds its run.log before the run starts
    (tmp_path / "cell" / "run.log").write_text("log")
    error_of([*FAST, "--out", "cell"], capsys)
    assert [p.name for p in (tmp_path / "cell").iterdir()] == ["run.log"]


# 3. exit codes tell whether the run finished


def test_sigterm_mid_run_exits_143_saying_how_to_resume(tmp_path, capsys):
    log = tmp_path / "killed.log"
    run_dir = tmp_path / "killed"
    with started([*FAST, "--epochs", "3", "--out", "killed"], log) as process:
        wait_for(lambda: rows(run_dir / "metrics.csv") >= 1, process, log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: run stopped by SIGTERM") and f"--resume --out {Path('killed')}" in last
    assert not (run_dir / "summary.json").exists() and no_lock_left(run_dir)
    epoch = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert f"keeps epoch {epoch}, the last completed one" in last
    assert run_cli.main([*FAST, "--out", "killed", "--resume"]) == 0
    assert [r["epoch"] for r in read_csv(run_dir / "metrics.csv")] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "sig, code, name",
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        # the same handler and clean-up as SIGTERM; only its exit code differs (10 s, so extended)
        pytest.param(signal.SIGINT, 130, "Ctrl-C", marks=pytest.mark.extended),
    ],
)
def test_a_signal_before_the_first_epoch_exits_non_zero_and_leaves_nothing(tmp_path, sig, code, name):
    log = tmp_path / "early.log"
    with started([*TINY, "--batch-size", "8", "--epochs", "2", "--out", "early"], log) as process:
        wait_for(lambda: (tmp_path / "early" / "config.json").is_file(), process, log)
        process.send_signal(sig)
        assert process.wait(timeout=120) == code, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: run stopped by {name}") and "before its first epoch completed" in last
    assert not (tmp_path / "early").exists()


def test_case_study_exits_1_when_runs_fail_and_spares_a_folder_in_use(tmp_path, capsys):
    grid = {
        "name": "hostile",
        "defaults": {"backbone": "test_resnet", "epochs": 1, "image_size": 32, "batch_size": 128},
        "seeds": 1,
        "cells": [
            {"id": "digits/offline", "data": "digits", "method": "pretrained", "flags": {"pretrained": True}},
            {"id": "digits/busy", "data": "digits", "method": "in use", "flags": {"loss": "ce"}},
        ],
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    busy = tmp_path / "res" / "runs" / "digits" / "busy" / "seed0"
    lock = RunLock(busy)
    lock.acquire()  # another case study is training this run
    (busy / "metrics.csv").write_text("epoch\n0\n")
    try:
        assert case_study.main(["--grid", "grid.yaml", "--results", "res", "--logger", "none"]) == 1
    finally:
        lock.release()
    captured = capsys.readouterr()
    assert "failed: digits/offline seed 0" in captured.out and "failed: digits/busy seed 0" in captured.out
    assert "in use by another run" in captured.out and "2 of 2 runs failed" in captured.err
    assert (busy / "metrics.csv").read_text() == "epoch\n0\n"  # not deleted under the other run
    assert (tmp_path / "res" / "table.md").is_file()


# 4. non-finite numbers


@pytest.mark.parametrize(
    "flags, breaks, says",
    [
        (["--lr", "1e30"], None, "became nan at epoch 0"),
        ([], {"after": 0}, "became nan at epoch 0, batch 0"),
        (["--loss", "focal"], {"after": 3, "value": float("inf")}, "(--loss focal) became"),
        (["--loss", "autobalance", "--lr", "1e30"], None, "the AutoBalance search's training loss became nan"),
    ],
)
def test_a_non_finite_training_loss_stops_the_run(tmp_path, capsys, monkeypatch, flags, breaks, says):
    if breaks is not None:
        break_backbone(monkeypatch, **breaks)
    message = error_of([*FAST, "--epochs", "2", *flags, "--out", "nan"], capsys)
    assert says in message and "lower --lr" in message
    if breaks and breaks["after"]:
        assert f"at epoch 0, batch {breaks['after']} of the epoch" in message
    assert not (tmp_path / "nan").exists() and no_lock_left(tmp_path / "nan")


def test_a_loss_turning_nan_later_keeps_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    break_backbone(monkeypatch, after=10 + 2)  # epoch 0 has 10 training steps
    message = error_of([*FAST, "--epochs", "3", "--out", "late"], capsys)
    assert "became nan at epoch 1, batch 2" in message and "keeps epoch 0, the last completed one" in message
    run_dir = tmp_path / "late"
    assert [r["epoch"] for r in read_csv(run_dir / "metrics.csv")] == ["0"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert no_lock_left(run_dir)


def nan_validation_metrics(value: float) -> dict[str, float]:
    import timm

    from imbalance.config import RunConfig
    from imbalance.losses import CrossEntropy

    backbone = Wrapped(timm.create_model("test_resnet", num_classes=2), eval_only=True, value=value)
    module = model_lib.ImbalanceClassifier(backbone, CrossEntropy(), RunConfig().to_dict(), [5, 5], image_size=32)
    images, labels = torch.randn(10, 3, 32, 32), torch.tensor([0, 1] * 5)
    loader = torch.utils.data.DataLoader(list(zip(images, labels, torch.arange(10), strict=True)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning) as caught:
        trainer.validate(module, [loader, loader], verbose=False)  # the two evaluation loaders: val, then dev
    said = [str(w.message) for w in caught]
    for stage in ("val", "dev"):
        warning = f"10 of 10 {stage} probabilities are NaN or infinite; this epoch's {stage} metrics are NaN"
        assert any(warning in line for line in said), (stage, said)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_validation_outputs_are_never_reported_as_metrics(value):
    metrics = nan_validation_metrics(value)
    for stage in ("val", "dev"):
        for name in ("auroc", "average_precision", "f1", "precision", "accuracy", "tn"):
            key = f"{stage}/{name}"
            assert math.isnan(metrics[key]), (key, metrics[key])
    labels, probs = [0, 1, 1, 0], [0.2, float("nan"), 0.9, 0.1]
    assert all(math.isnan(v) for k, v in confusion_metrics(labels, probs, 0.5).items() if k != "threshold")
    assert math.isnan(best_f1_threshold(labels, probs))


def test_a_run_whose_validation_outputs_are_nan_records_nan(tmp_path, monkeypatch):
    break_backbone(monkeypatch, eval_only=True)
    assert run_cli.main([*FAST, "--epochs", "2", "--out", "evalnan"]) == 0
    history = read_csv(tmp_path / "evalnan" / "metrics.csv")
    assert len(history) == 2
    for row in history:
        assert row["val/auroc"] == "nan" and row["val/f1"] == "nan" and row["train/f1"] != "nan"
        assert row["dev/auroc"] == "nan" and row["dev/f1"] == "nan"
    summary = json.loads((tmp_path / "evalnan" / "summary.json").read_text())
    results = summary["results"]
    assert set(results) == {"last_epoch", "dev_selected_checkpoint", "dev_tuned_threshold", "posthoc_la"}
    for name, result in results.items():  # no result set, however its rule was chosen, reports a number
        for key in ("f1", "precision", "recall", "balanced_accuracy", "auroc", "average_precision"):
            assert math.isnan(result[key]), (name, key, result[key])
    assert summary["pictures"] == []


# 5. --resume with a checkpoint that is not this run's


def test_resume_with_a_broken_or_foreign_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert run_cli.main([*FAST, "--epochs", "1", "--out", "r"]) == 0
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    ckpt = torch.load(last, weights_only=True)

    def saved(value) -> bytes:
        torch.save(value, tmp_path / "tmp.ckpt")
        return (tmp_path / "tmp.ckpt").read_bytes()

    other_backbone = {**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"]}}
    other_backbone["hyper_parameters"]["config"] = {**ckpt["hyper_parameters"]["config"], "backbone": "resnet18"}
    reshaped = {**ckpt, "state_dict": {**ckpt["state_dict"]}}
    head = next(k for k in reshaped["state_dict"] if k.endswith("fc.weight"))
    reshaped["state_dict"][head] = torch.zeros(3, reshaped["state_dict"][head].shape[1])
    cases = {
        "truncated": (good[: len(good) // 2], "not a readable torch checkpoint, truncated or corrupt"),
        "empty": (b"", "(0 bytes) is not a readable torch checkpoint"),
        "random bytes": (random.Random(0).randbytes(4096), "not a readable torch checkpoint"),
        "bytes read as an old pickle": (b"\x80\x02" + bytes(range(256)) * 4, "not a readable torch checkpoint"),
        "a bare state dict": (saved(ckpt["state_dict"]), "not the Lightning checkpoint this repository writes"),
        "pickled code": (saved({"state_dict": Path("x")}), "a safe load (weights_only) refuses"),
        "another run's": (saved(other_backbone), "written by another run: --backbone resnet18"),
        "another model's": (saved(reshaped), "does not fit this run's model (shapes differ"),
    }
    for name, (data, says) in cases.items():
        last.write_bytes(data)
        message = error_of([*FAST, "--out", "r", "--resume", "--epochs", "2"], capsys)
        assert says in message and f"--resume: {Path('r', 'checkpoints', 'last.ckpt')} " in message, (name, message)
        assert "--overwrite" in message, name
        assert no_lock_left(tmp_path / "r"), name
    last.write_bytes(good)
    assert run_cli.main([*FAST, "--out", "r", "--resume", "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs_completed"] == 2


def _one_line_error(args: list[str], capsys, main=None) -> str:
    from experiments import run as run_cli

    with pytest.raises(SystemExit) as exit_info:
        (main or run_cli.main)(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_paths_of_the_wrong_kind_are_one_line_errors(tmp_path, capsys):
    # found by a hostile review: --out on a file, a .lock that is a folder, folders given for files,
    # and a config.json that is not a JSON object
    from experiments import evaluate as evaluate_cli

    tiny = ["--backbone", "test_resnet", "--image-size", "16", "--epochs", "1", "--logger", "none"]
    (tmp_path / "afile").write_text("hi")
    assert "--out afile is a file, not a folder" in _one_line_error([*tiny, "--out", "afile"], capsys)
    (tmp_path / "locked" / ".lock").mkdir(parents=True)
    assert "locked/.lock" in _one_line_error([*tiny, "--out", "locked"], capsys)
    (tmp_path / "adir").mkdir()
    assert "is a folder, not a manifest.json" in _one_line_error([*tiny, "--manifest", "adir", "--out", "m"], capsys)
    err = _one_line_error(["--checkpoint", "adir", "--out", "ev"], capsys, main=evaluate_cli.main)
    assert "--checkpoint adir is a folder" in err
    listed = tmp_path / "listed"
    (listed / "checkpoints").mkdir(parents=True)
    (listed / "checkpoints" / "last.ckpt").write_bytes(b"")
    (listed / "config.json").write_text("[1, 2]")
    assert "JSON object" in _one_line_error([*tiny, "--out", "listed", "--resume"], capsys)
