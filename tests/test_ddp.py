"""Multi-process behaviour on CPU (gloo): DDP equals one process, kill-and-resume, determinism."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import make_class_tree

from experiments import run as run_cli
from imbalance.config import RunConfig
from imbalance.data import load_split
from imbalance.losses import LOSSES

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_two_process_ddp_gives_the_single_process_answer(tmp_path):
    # A frozen backbone keeps batch-norm out of the comparison (its statistics are per process by design);
    # per-device batch 4 on 2 processes is the same global batch, and the same samples, as batch 8 on one.
    # The class-weighted loss checks that its weighted mean is normalised over the global batch; random
    # images and a large learning rate make the predictions move, so equal metrics mean equal models.
    tree = make_class_tree(tmp_path / "pets", {"Cat": 14, "Dog": 40}, learnable=False)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "w.pt")
    common = [
        "--data-dir",
        str(tree),
        "--train-counts",
        "10,30",
        "--val-counts",
        "4,9",
        "--backbone",
        "test_resnet",
        "--image-size",
        "32",
        "--weights",
        str(tmp_path / "w.pt"),
        "--freeze-backbone",
        "--epochs",
        "3",
        "--lr",
        "0.5",
        "--loss",
        "weighted",
        "--num-workers",
        "0",
        "--seed",
        "3",
    ]
    cli(*common, "--batch-size", "8", "--logger", "csv", "--out", "one")
    ddp = cli(
        *common, "--batch-size", "4", "--accelerator", "cpu", "--devices", "2", "--logger", "wandb", "--out", "two"
    )
    assert ddp.stdout.count("summary: ") == 1  # rank 0 alone reports
    one, two = tmp_path / "one", tmp_path / "two"
    assert len(list(two.glob("wandb/offline-run-*"))) == 1 and not list(tmp_path.glob("wandb"))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["global_batch_size"] == 8 and summary["epochs_completed"] == 3
    rows_one, rows_two = read_csv(one / "metrics.csv"), read_csv(two / "metrics.csv")
    for a, b in zip(rows_one, rows_two, strict=True):
        for stage in ("val", "dev"):  # both evaluation sets: the same counts from 1 and from 2 processes
            for key in ("tp", "fp", "tn", "fn", "f1", "precision", "recall"):
                assert float(a[f"{stage}/{key}"]) == float(b[f"{stage}/{key}"]), (stage, key)
            assert float(a[f"{stage}/auroc"]) == pytest.approx(float(b[f"{stage}/auroc"]), abs=1e-6), stage
        # the training loss too: each rank's weighted loss is its share of the global batch's, so the epoch's
        # loss is the ranks' mean (synced), not rank 0's own batches
        assert float(a["train/loss_epoch"]) == pytest.approx(float(b["train/loss_epoch"]), rel=1e-5)
    preds_one, preds_two = read_csv(one / "predictions.csv"), read_csv(two / "predictions.csv")
    assert [r["path"] for r in preds_one] == [r["path"] for r in preds_two] and len(preds_two) == 13
    for a, b in zip(preds_one, preds_two, strict=True):
        for column in ("prob_last", "prob_dev_selected"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), column
    assert json.loads((one / "summary.json").read_text())["dev_counts"] == summary["dev_counts"]


TINY = ["--backbone", "test_resnet", "--image-size", "32", "--epochs", "4", "--logger", "csv"]


# 43 s of three runs; the SIGTERM exit (143) and the resume after it are also tested, faster, in test_hostile_runs
@pytest.mark.extended
def test_killed_run_resumes_to_the_same_result(tmp_path):
    cli(*TINY, "--out", "full")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *TINY, "--out", "killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(read_csv(metrics)) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # during epoch 2 (or its validation)
    assert process.wait(timeout=120) == 143  # not finished: a scheduler must not read it as a success
    assert not (tmp_path / "killed" / "summary.json").exists()  # no half-finished summary
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "killed").rglob("*.tmp"))
    cli(*TINY, "--out", "killed", "--resume")
    full, resumed = read_csv(tmp_path / "full" / "metrics.csv"), read_csv(tmp_path / "killed" / "metrics.csv")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2", "3"]
    assert list(full[0]) == list(resumed[0])  # the same columns: train/* of the checkpointed epoch too
    for a, b in zip(full, resumed, strict=True):
        assert a == b  # every column, train and val
    best_full = json.loads((tmp_path / "full" / "summary.json").read_text())["best"]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["best"] == best_full


def test_resume_without_a_checkpoint_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        run_cli.main([*TINY, "--out", "nothing-here", "--resume"])
    assert "nothing-here/checkpoints/last.ckpt does not exist" in capsys.readouterr().err


def test_same_seed_same_metrics(tmp_path):
    for name in ("a", "b"):
        assert run_cli.main([*TINY, "--epochs", "2", "--deterministic", "--sampling", "over", "--out", name]) == 0
    assert read_csv(tmp_path / "a" / "metrics.csv") == read_csv(tmp_path / "b" / "metrics.csv")


def test_autobalance_search_under_ddp_finds_the_single_process_alpha(tmp_path):
    # ConvNeXt normalises per sample (LayerNorm), so 2 x batch 4 trains like 1 x batch 8, and the ranks gather
    # their features for the hypergradient: alpha agrees up to floating-point reduction order. (The search
    # split leaves 8 + 32 training images: even, so no rank pads its shard.)
    tree = make_class_tree(tmp_path / "pets", {"Cat": 16, "Dog": 48})
    common = [
        "--data-dir",
        str(tree),
        "--train-counts",
        "10,40",
        "--val-counts",
        "4,4",
        "--backbone",
        "test_convnext",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--loss",
        "autobalance",
        "--autobalance-search-epochs",
        "3",
        "--num-workers",
        "0",
        "--logger",
        "csv",
        "--seed",
        "1",
    ]
    cli(*common, "--batch-size", "8", "--out", "one")
    cli(*common, "--batch-size", "4", "--accelerator", "cpu", "--devices", "2", "--out", "two")
    one, two = (json.loads((tmp_path / d / "autobalance_params.json").read_text()) for d in ("one", "two"))
    moved = max(abs(a - b) for a, b in zip(one["weights"] + one["scales"], [1.0] * 4, strict=True))
    assert moved > 0.05, one  # the search did move alpha
    for key in ("weights", "scales", "offsets"):
        assert one[key] == pytest.approx(two[key], abs=1e-3), (key, one[key], two[key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_loss_finishes_under_ddp_with_uneven_validation_shards(tmp_path):
    # Validation is sharded without padding: 5 images at batch 2 give rank 0 two batches and rank 1 one. A loss
    # that all-reduces in a validation step (the class-weighted ones did) hangs there; the deadline makes a hang
    # a failure. All losses run one after another in the same two processes to keep the test short. The two
    # ranks are started as torchrun would start them, in one process group, so a hang is killed as a whole.
    tree = make_class_tree(tmp_path / "pets", {"Cat": 14, "Dog": 24})
    script = Path(__file__).with_name("ddp_every_loss.py")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "TORCHELASTIC_RUN_ID": "test",  # Lightning then takes the ranks from the environment
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
    }
    processes, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        group = 0 if rank == 0 else processes[0].pid  # rank 0 leads a new process group, rank 1 joins it
        processes.append(
            subprocess.Popen(
                [sys.executable, "-u", str(script), str(tree), str(tmp_path / "runs")],
                stdout=logs[-1].open("w"),
                stderr=subprocess.STDOUT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                preexec_fn=lambda group=group: os.setpgid(0, group),
            )
        )
    try:
        deadline = time.time() + 420
        while time.time() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.5)
        output = "\n".join(f"--- rank {r} ---\n" + log.read_text()[-2500:] for r, log in enumerate(logs))
        if any(p.poll() is None for p in processes):
            pytest.fail(f"2-process DDP hung (killed after 420 s):\n{output}")
    finally:  # never leave a rank behind, whatever failed
        if any(p.poll() is None for p in processes):
            os.killpg(processes[0].pid, signal.SIGKILL)
    assert [p.returncode for p in processes] == [0, 0], output
    split = load_split(RunConfig(data_dir=tree, train_counts=(10, 12), val_counts=(3, 2)))  # one process's draw
    single = {
        "dev_counts": dict(zip(split.class_names, split.dev_counts, strict=True)),
        "train_counts": dict(zip(split.class_names, split.train_counts, strict=True)),
    }
    assert single["dev_counts"] == {"Dog": 2, "Cat": 1}
    for loss in LOSSES:
        assert f"finished {loss}" in logs[0].read_text(), output
        summary = json.loads((tmp_path / "runs" / loss / "summary.json").read_text())
        assert summary["epochs_completed"] == 2 and summary["val_counts"] == {"Dog": 2, "Cat": 3}, loss
        # the dev split (ceil 10% of 10 cats and 12 dogs: 3 photos, shards of 2 and 1) is the one a single
        # process draws, and every dev and val photo is counted once per epoch across the two ranks
        assert summary["dev_counts"] == single["dev_counts"] and summary["train_counts"] == single["train_counts"], loss
        for row in csv.DictReader((tmp_path / "runs" / loss / "metrics.csv").open()):
            for stage, n in (("dev", 3), ("val", 5)):
                assert sum(float(row[f"{stage}/{k}"]) for k in ("tp", "fp", "tn", "fn")) == n, (loss, stage, row)
        assert len((tmp_path / "runs" / loss / "predictions.csv").read_text().splitlines()) == 1 + 5, loss
