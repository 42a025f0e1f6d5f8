"""experiments.evaluate: checkpoints that evaluate anywhere, manifest replay, pre-split folders, clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_tree
from PIL import Image

from experiments import evaluate as evaluate_cli
from experiments import run as run_cli
from imbalance.calibration import binary_nll
from imbalance.config import RunConfig
from imbalance.data import load_split
from imbalance.metrics import calibration_metrics

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "64", "--num-workers", "0"]
TINY += ["--logger", "none"]


def train(out: str, *args: str) -> Path:
    """A one-epoch run into `out`; returns its run directory."""
    assert run_cli.main([*TINY, "--epochs", "1", *args, "--out", out]) == 0
    return Path(out)


def evaluate(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of `experiments.evaluate` (0 and its stderr when it returns)."""
    capsys.readouterr()
    try:
        code = evaluate_cli.main([*args, "--bootstrap", "0"])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def prediction_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    """20 cats and 40 dogs: enough for a one-epoch run in seconds."""
    return make_class_tree(tmp_path / "pets", {"Cat": 20, "Dog": 40})


# ------------------------------------------------------------------ 1. checkpoints that evaluate anywhere


def test_autobalance_checkpoint_evaluates_after_the_run_folder_moved(pets, tmp_path, monkeypatch, capsys):
    train("runs/ab", "--data-dir", str(pets), "--loss", "autobalance", "--autobalance-search-epochs", "1")
    moved = tmp_path / "archive" / "ab"
    moved.parent.mkdir()
    shutil.move(tmp_path / "runs" / "ab", moved)  # autobalance_params.json moves with it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = moved / "checkpoints" / "best.ckpt"
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--data-dir", str(pets), "--out", "ev")
    assert code == 0, err
    assert json.loads((elsewhere / "ev" / "metrics.json").read_text())["images"] == 60
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev-default")
    assert code == 0, err
    replayed = prediction_rows(elsewhere / "ev-default" / "predictions.csv")
    assert [r["path"] for r in replayed] == [r["path"] for r in prediction_rows(moved / "predictions.csv")]


def test_bce_checkpoint_has_one_output(pets, tmp_path, capsys):
    run_dir = train("runs/bce", "--data-dir", str(pets), "--loss", "bce")
    code, err = evaluate(capsys, "--checkpoint", str(run_dir / "checkpoints" / "best.ckpt"), "--out", "ev")
    assert code == 0, err
    rows = prediction_rows(tmp_path / "ev" / "predictions.csv")
    expected = prediction_rows(run_dir / "predictions.csv")
    assert [float(r["prob_positive"]) for r in rows] == pytest.approx(  # best.ckpt: the dev-selected epoch
        [float(r["prob_dev_selected"]) for r in expected], abs=1e-4
    )

    # calibration: a temperature fitted on the run's dev split, reported on the evaluated images
    manifest = json.loads((run_dir / "manifest.json").read_text())
    calibration = json.loads((tmp_path / "ev" / "metrics.json").read_text())["calibration"]
    assert calibration["fitted_on"].startswith(f"the dev split ({len(manifest['dev'])} photos)")
    assert 0 < calibration["temperature"] < float("inf") and set(calibration["evaluated"]) == {"before", "after"}
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([r["prob_positive"] for r in rows], dtype=np.float32)  # %.9g: the model's float32 exactly
    before = calibration["evaluated"]["before"]
    assert before == {"nll": binary_nll(labels, probs), **calibration_metrics(labels, probs)}
    with Image.open(tmp_path / "ev" / "reliability.png") as image:
        assert image.format == "PNG"

    # away from its run (no manifest) a folder evaluates with nothing to fit a temperature on
    alone = tmp_path / "alone" / "best.ckpt"
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", alone)
    code, err = evaluate(capsys, "--checkpoint", str(alone), "--data-dir", str(pets), "--out", "ev-alone")
    assert code == 0, err
    calibration = json.loads((tmp_path / "ev-alone" / "metrics.json").read_text())["calibration"]
    assert calibration["temperature"] is None and calibration["fitted_on"].startswith("nothing: no dev split")
    assert set(calibration["evaluated"]) == {"before"} and (tmp_path / "ev-alone" / "reliability.png").is_file()


@pytest.fixture
def digits_ckpt(tmp_path: Path) -> Path:
    return train("runs/d") / "checkpoints" / "best.ckpt"


def test_checkpoint_file_errors_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all\n" * 10)
    code, err = evaluate(capsys, "--checkpoint", str(garbage), "--out", "ev")
    assert_one_line_error(code, err, "--checkpoint", "garbage.ckpt")

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, err = evaluate(capsys, "--checkpoint", str(foreign), "--out", "ev")
    assert_one_line_error(code, err, "foreign.ckpt", "not written by this repository")

    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)
    code, err = evaluate(capsys, "--checkpoint", str(tensor), "--out", "ev")
    assert_one_line_error(code, err, "tensor.ckpt")

    code, err = evaluate(capsys, "--checkpoint", str(tmp_path / "none.ckpt"), "--out", "ev")
    assert_one_line_error(code, err, "none.ckpt", "does not exist")


def test_run_related_errors_are_one_line(digits_ckpt, tmp_path, capsys):
    code, err = evaluate(capsys, "--checkpoint", str(digits_ckpt), "--data-dir", "no/such/dir", "--out", "ev")
    assert_one_line_error(code, err, "--data-dir no/such/dir does not exist")

    checkpoint = torch.load(digits_ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["from_the_future"] = 1
    newer = tmp_path / "newer.ckpt"
    torch.save(checkpoint, newer)
    code, err = evaluate(capsys, "--checkpoint", str(newer), "--out", "ev")
    assert_one_line_error(code, err, "unknown configuration keys", "from_the_future")

    checkpoint = torch.load(digits_ckpt, map_location="cpu", weights_only=True)
    del checkpoint["state_dict"]["backbone.fc.weight"]
    broken = tmp_path / "runs" / "d" / "checkpoints" / "broken.ckpt"
    torch.save(checkpoint, broken)
    code, err = evaluate(capsys, "--checkpoint", str(broken), "--out", "ev")
    assert_one_line_error(code, err, "broken.ckpt")


# ----------------------------------------------------------------- 3. pre-split folders: the validation part


def test_presplit_folder_evaluates_only_its_validation_part(tmp_path, capsys):
    root = tmp_path / "cats_and_dogs"
    make_class_tree(root / "train", {"cat": 10, "dog": 20})
    make_class_tree(root / "validation", {"cat": 6, "dog": 8})
    run_dir = train("runs/pre", "--data-dir", str(root))
    code, err = evaluate(
        capsys, "--checkpoint", str(run_dir / "checkpoints" / "best.ckpt"), "--data-dir", str(root), "--out", "ev"
    )
    assert code == 0, err
    rows = prediction_rows(tmp_path / "ev" / "predictions.csv")
    assert len(rows) == 14 and all(r["path"].startswith("validation/") for r in rows)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in prediction_rows(run_dir / "predictions.csv"))
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["images"] == 14
    assert metrics["data"] == f"validation/ part of pre-split folder {root}"


# --------------------------------------------------------------------- 4. replaying the run's manifest


def test_evaluate_replays_the_manifest_after_the_folder_changed(pets, tmp_path, capsys):
    run_dir = train("runs/m", "--data-dir", str(pets))
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    train_cat = next(p for p, label in manifest["train"] if label == 1)
    (pets / train_cat).unlink()  # a re-drawn split would now move training photos into validation
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev")
    assert code == 0, err
    rows = prediction_rows(tmp_path / "ev" / "predictions.csv")
    expected = prediction_rows(run_dir / "predictions.csv")
    assert [r["path"] for r in rows] == [p for p, _ in manifest["val"]] == [r["path"] for r in expected]
    assert [float(r["prob_positive"]) for r in rows] == pytest.approx(  # best.ckpt: the dev-selected epoch
        [float(r["prob_dev_selected"]) for r in expected], abs=1e-4
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "manifest" in metrics["data"] and str(run_dir / "manifest.json") in metrics["data"]

    # an explicit --manifest is the same split
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--manifest", str(run_dir / "manifest.json"), "--out", "e2")
    assert code == 0, err
    assert prediction_rows(tmp_path / "e2" / "predictions.csv") == rows

    # --manifest with --data-dir: the same split, read from a moved copy of the folder
    shutil.copytree(pets, tmp_path / "copy")
    code, err = evaluate(
        capsys,
        "--checkpoint",
        str(ckpt),
        "--manifest",
        str(run_dir / "manifest.json"),
        "--data-dir",
        "copy",
        "--out",
        "ev-copy",
    )
    assert code == 0, err
    assert [r["path"] for r in prediction_rows(tmp_path / "ev-copy" / "predictions.csv")] == [r["path"] for r in rows]

    # a validation photo that no longer decodes is refused by name, never scored as something else
    val_file = pets / manifest["val"][0][0]
    val_file.write_bytes(val_file.read_bytes()[:100])
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev3")
    assert_one_line_error(code, err, manifest["val"][0][0], "integrity scan")
    val_file.unlink()
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev4")
    assert_one_line_error(code, err, "missing", manifest["val"][0][0])


def test_evaluate_refuses_a_tampered_or_foreign_manifest(pets, tmp_path, capsys):
    run_dir = train("runs/t", "--data-dir", str(pets))
    ckpt = run_dir / "checkpoints" / "best.ckpt"

    foreign = tmp_path / "foreign.json"  # a valid manifest of another split of the same folder
    foreign.write_text(json.dumps(load_split(RunConfig(data_dir=pets, seed=7)).manifest()))
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--manifest", str(foreign), "--out", "ev")
    assert_one_line_error(code, err, "foreign.json", "not the split this checkpoint was trained on")

    tampered = json.loads((run_dir / "manifest.json").read_text())
    tampered["val"].append(tampered["train"].pop())
    (run_dir / "manifest.json").write_text(json.dumps(tampered))
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev")
    assert_one_line_error(code, err, "manifest.json", "sha256")

    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--manifest", "no/such.json", "--out", "ev")
    assert_one_line_error(code, err, "--manifest no/such.json does not exist")

    alone = tmp_path / "alone" / "best.ckpt"  # a checkpoint copied away from its run
    alone.parent.mkdir()
    shutil.copy(ckpt, alone)
    code, err = evaluate(capsys, "--checkpoint", str(alone), "--out", "ev")
    assert_one_line_error(code, err, "--manifest", "--data-dir")


def test_old_checkpoint_without_a_manifest_hash_replays_the_runs_manifest(pets, tmp_path, capsys):
    run_dir = train("runs/old", "--data-dir", str(pets))
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"].pop("manifest_sha256")
    torch.save(checkpoint, ckpt)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (pets / manifest["train"][0][0]).unlink()  # the folder changed; the manifest still says what the run used
    code, err = evaluate(capsys, "--checkpoint", str(ckpt), "--out", "ev")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "manifest" in notes[0]
    rows = prediction_rows(tmp_path / "ev" / "predictions.csv")
    assert [r["path"] for r in rows] == [r["path"] for r in prediction_rows(run_dir / "predictions.csv")]
