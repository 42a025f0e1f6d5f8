"""The run and evaluate command lines end to end, on the embedded digits and on generated photos."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import lightning as L
import pytest
from conftest import make_class_tree
from PIL import Image
from sklearn import metrics as skm
from wandb_records import history_rows

from experiments import evaluate as evaluate_cli
from experiments import run as run_cli
from imbalance.config import RunConfig
from imbalance.train import prepare

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "64"]


def run(args: list[str]) -> dict:
    assert run_cli.main(args) == 0
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def test_embedded_default_end_to_end(tmp_path, capsys):
    summary = run([*TINY, "--loss", "focal", "--epochs", "2", "--logger", "csv", "--out", "runs/digits"])
    assert "embedded digits" in capsys.readouterr().out
    best = summary["best"]["metrics"]
    for key in ("val/precision", "val/recall", "val/f1"):
        assert math.isfinite(best[key]) and 0 <= best[key] <= 1
    run_dir = tmp_path / "runs" / "digits"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(r["val/f1"] != "" and r["train/f1"] != "" for r in rows)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    for name in ("config.json", "manifest.json", "predictions.csv", "skipped.csv"):
        assert (run_dir / name).is_file(), name
    # the 75% training part (1,217 / 130) less its dev split, ceil(10%) of each class
    assert summary["train_counts"] == {"not-8": 1095, "8": 117} and summary["dev_counts"] == {"not-8": 122, "8": 13}
    assert summary["config"]["loss"] == "focal" and summary["wall_time_s"] > 0
    cm, last = summary["confusion_matrix"]["matrix"], summary["results"]["last_epoch"]
    assert cm[0][0] == last["tn"] and cm[1][1] == last["tp"] and sum(map(sum, cm)) == 450
    assert last["f1"] == pytest.approx(rows[-1]["val/f1"] and float(rows[-1]["val/f1"]), abs=1e-6)


def test_wandb_offline_run_holds_per_epoch_val_f1(tmp_path, capsys):
    run([*TINY, "--epochs", "2", "--logger", "wandb", "--out", "runs/wb"])
    assert "wandb sync" in capsys.readouterr().out
    rows = [r for r in history_rows(tmp_path / "runs" / "wb") if "val/f1" in r]
    assert [r["epoch"] for r in rows] == [0, 1]
    metrics = list(csv.DictReader((tmp_path / "runs" / "wb" / "metrics.csv").open()))
    assert [r["val/f1"] for r in rows] == pytest.approx([float(m["val/f1"]) for m in metrics])
    assert (tmp_path / "runs" / "wb" / "wandb_id.txt").read_text().strip()
    logged = {key.split("/_")[0] for row in history_rows(tmp_path / "runs" / "wb") for key in row}
    for key in ("val/confusion_matrix_table", "val/pr_curve_table", "val/misclassified", "pictures/pr_curve"):
        assert any(k.startswith(key) for k in logged), key


def test_pictures_are_valid_pngs(tmp_path):
    run([*TINY, "--epochs", "2", "--logger", "none", "--out", "runs/pics"])
    summary = json.loads((tmp_path / "runs" / "pics" / "summary.json").read_text())
    assert summary["pictures"] == [
        "confusion_matrix.png",
        "pr_curve.png",
        "curves.png",
        "mistakes.png",
        "reliability.png",
    ]
    for name in summary["pictures"]:
        with Image.open(tmp_path / "runs" / "pics" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_val_metrics_are_exact_for_odd_sizes_and_batches(tmp_path):
    tree = make_class_tree(tmp_path / "odd", {"Cat": 9, "Dog": 28})
    summary = run(
        [
            *TINY,
            "--data-dir",
            str(tree),
            "--train-counts",
            "5,19",
            "--val-counts",
            "4,9",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--logger",
            "none",
            "--num-workers",
            "0",
            "--out",
            "runs/odd",
        ]
    )
    rows = list(csv.DictReader((tmp_path / "runs" / "odd" / "predictions.csv").open()))
    assert len(rows) == 13  # every validation image exactly once, none padded
    labels = [int(r["label"]) for r in rows]
    pred = [int(float(r["prob_dev_selected"]) > 0.5) for r in rows]
    best = summary["best"]["metrics"]  # torchmetrics' epoch values of the dev-selected epoch
    assert best["val/f1"] == pytest.approx(skm.f1_score(labels, pred, zero_division=0), abs=1e-6)
    assert best["val/recall"] == pytest.approx(skm.recall_score(labels, pred, zero_division=0), abs=1e-6)
    assert best["val/tp"] + best["val/fp"] + best["val/tn"] + best["val/fn"] == 13
    assert best["dev/tp"] + best["dev/fp"] + best["dev/tn"] + best["dev/fn"] == 1 + 2  # ceil(10%) of 5 and 19


def test_photos_run_and_evaluate_match_sklearn(pet_tree, tmp_path):
    summary = run(
        [
            *TINY,
            "--data-dir",
            str(pet_tree),
            "--epochs",
            "3",
            "--logger",
            "none",
            "--loss",
            "weighted",
            "--num-workers",
            "0",
            "--out",
            "runs/pets",
        ]
    )
    assert summary["train_counts"]["Cat"] + summary["dev_counts"]["Cat"] + summary["val_counts"]["Cat"] == 30
    assert "dev" in summary["results"]["dev_tuned_threshold"]["chosen_by"]
    ckpt = tmp_path / "runs" / "pets" / "checkpoints" / "best.ckpt"
    assert (
        evaluate_cli.main(
            [
                "--checkpoint",
                str(ckpt),
                "--data-dir",
                str(pet_tree),
                "--out",
                "eval",
                "--threshold",
                "0.3",
                "--bootstrap",
                "200",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert len(rows) == metrics["images"] == 120
    labels = [int(r["label"]) for r in rows]
    probs = [float(r["prob_positive"]) for r in rows]
    assert all(int(r["label"]) == int(r["path"].startswith("Cat")) for r in rows)
    results = metrics["results"]
    assert list(results) == ["threshold_0.5", "dev_tuned_threshold", "posthoc_la", "given_threshold"]
    assert "dev split" in metrics["dev"]  # the thresholds were tuned on the run's dev photos, not these
    for key, r in results.items():
        pred = [int(p > r["threshold"]) for p in probs]
        assert r["f1"] == pytest.approx(skm.f1_score(labels, pred, zero_division=0), abs=1e-4), key
        assert r["precision"] == pytest.approx(skm.precision_score(labels, pred, zero_division=0), abs=1e-4), key
        assert r["recall"] == pytest.approx(skm.recall_score(labels, pred, zero_division=0), abs=1e-4), key
        assert r["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-3)
        assert r["f1_ci95"]["low"] <= r["f1"] <= r["f1_ci95"]["high"]
    assert results["given_threshold"]["threshold"] == 0.3


def test_evaluate_defaults_to_the_runs_validation_split(tmp_path):
    summary = run([*TINY, "--epochs", "1", "--logger", "none", "--out", "runs/d"])
    ckpt = tmp_path / "runs" / "d" / "checkpoints" / "best.ckpt"
    evaluate_cli.main(["--checkpoint", str(ckpt), "--out", "ev", "--bootstrap", "0"])
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 450
    assert metrics["results"]["threshold_0.5"]["f1"] == pytest.approx(summary["best"]["metrics"]["val/f1"], abs=1e-6)
    selected = summary["results"]["dev_selected_checkpoint"]  # best.ckpt: the same model, the same photos
    assert metrics["results"]["threshold_0.5"]["f1"] == pytest.approx(selected["f1"], abs=1e-6)


def test_fast_dev_run_smoke():
    cfg = RunConfig(backbone="test_resnet", image_size=32, loss="ldam", fast_dev_run=True).validate()
    _, module, datamodule = prepare(cfg)
    trainer = L.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, use_distributed_sampler=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "no/such/folder"], "--data-dir no/such/folder does not exist"),
        (["--gpus", "2"], "--accelerator cpu --devices 2"),
        (["--gamma", "2"], "--gamma is a focal-loss option"),
        (["--class-weights", "6,0.55"], "--class-weights needs --loss weighted"),
        (["--pretrained", "--weights", "w.pt"], "give only one of them"),
        (["--freeze-backbone"], "add --pretrained or --weights"),
        (["--split", "imbalanced-1"], "Add --data-dir"),
        (["--backbone", "resnet_19"], "--backbone 'resnet_19'"),
        (["--loss", "ldam", "--drw-epoch", "0", "--pretrained"], "--pretrained"),
    ],
)
def test_bad_options_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main([*args, "--epochs", "1", "--logger", "none"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run_cli.main(["--lossy", "ce"])
    assert "unrecognized arguments: --lossy" in capsys.readouterr().err


@pytest.mark.parametrize(
    "loss",
    [
        "ce",
        "bce",
        "weighted",
        "focal",
        "sigmoid-focal",
        "cb",
        "ldam",
        "logit-adjusted",
        "balanced-softmax",
        "vs",
        "autobalance",
    ],
)
def test_every_loss_runs_from_the_cli_on_the_embedded_default(loss, tmp_path):
    extra = ["--autobalance-search-epochs", "1"] if loss == "autobalance" else []
    smoke_dirs = set(Path(tempfile.gettempdir()).glob("imbalance-fast-dev-run-*"))
    assert run_cli.main([*TINY, "--loss", loss, "--fast-dev-run", "--logger", "none", *extra]) == 0
    assert not list(tmp_path.glob("runs/**/*.*")), "a --fast-dev-run smoke test writes nothing"
    assert set(Path(tempfile.gettempdir()).glob("imbalance-fast-dev-run-*")) <= smoke_dirs  # nor leaves any
