"""The run recorder's choices: which epoch is "best" (on dev), which predictions each result set comes from,
and the temperature scaling it reports (fitted on dev, reported on val)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from imbalance.calibration import fit_temperature, temperature_report
from imbalance.config import RunConfig
from imbalance.data import SplitData
from imbalance.metrics import confusion_metrics
from imbalance.recorder import RunRecorder

LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def recorder(tmp_path: Path, dev: bool = True, **cfg) -> RunRecorder:
    items = [(f"digits:{i}", int(y)) for i, y in enumerate(LABELS)]  # embedded digits: the pictures load them
    dev_items = [(f"digits:{10 + i}", y) for i, (_, y) in enumerate(items)] if dev else []
    split = SplitData("test", ("dog", "cat"), [("a", 0), ("b", 1)], items, dev=dev_items)
    return RunRecorder(tmp_path, RunConfig(**cfg), split, {})


def validate(
    rec: RunRecorder,
    epoch: int,
    probs: list[float],
    auroc: float,
    balanced_accuracy: float = 0.5,
    dev_probs: list[float] | None = None,
) -> None:
    """One epoch; the dev metrics are given (the rule reads them), the dev predictions are `dev_probs` (the
    val ones when not given; none when the recorder's split has no dev part)."""
    probs_t = torch.tensor(probs)
    f1 = confusion_metrics(LABELS.numpy(), probs_t.numpy(), 0.5)["f1"]
    trainer = SimpleNamespace(
        sanity_checking=False,
        fast_dev_run=True,  # no checkpoint file in this unit test
        current_epoch=epoch,
        callback_metrics={
            "val/f1": torch.tensor(f1),
            "dev/auroc": torch.tensor(auroc),
            "dev/balanced_accuracy": torch.tensor(balanced_accuracy),
        },
        is_global_zero=True,
    )
    predictions = {"index": torch.arange(6), "label": LABELS, "prob": probs_t}
    dev = {**predictions, "prob": torch.tensor(dev_probs)} if dev_probs is not None else predictions
    module = SimpleNamespace(val_predictions=predictions, dev_predictions=dev if rec.split.dev else None)
    rec.on_validation_end(trainer, module)
    rec.on_train_epoch_end(trainer, module)


def test_result_sets_other_than_the_dev_selected_one_come_from_the_last_epoch(tmp_path):
    rec = recorder(tmp_path)
    good = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]  # epoch 0: the best dev AUROC
    last = [0.3, 0.45, 0.6, 0.4, 0.55, 0.65]  # epoch 1
    validate(rec, 0, good, auroc=1.0)
    validate(rec, 1, last, auroc=0.7)
    assert rec.best["epoch"] == 0
    results = rec.results()
    labels = LABELS.numpy()
    for key in ("last_epoch", "dev_tuned_threshold", "posthoc_la"):
        assert results[key]["epoch"] == 1 and results[key]["predictions"] == "prob_last", key
        assert results[key]["f1"] == confusion_metrics(labels, np.array(last), results[key]["threshold"])["f1"], key
    assert results["dev_selected_checkpoint"]["epoch"] == 0 and results["dev_selected_checkpoint"]["f1"] == 1.0
    assert results["dev_tuned_threshold"]["f1"] < 1.0  # not the dev-selected epoch's perfect ranking


def test_best_epoch_ties_on_dev_auroc_are_broken_by_dev_balanced_accuracy_then_the_later_epoch(tmp_path):
    rec = recorder(tmp_path)
    nothing = [0.1] * 6  # a model that never predicts the positive class
    validate(rec, 0, nothing, auroc=0.5)
    validate(rec, 1, nothing, auroc=0.8, balanced_accuracy=0.6)
    validate(rec, 2, nothing, auroc=0.8, balanced_accuracy=0.55)
    assert rec.best["epoch"] == 1
    validate(rec, 3, nothing, auroc=0.8, balanced_accuracy=0.6)
    assert rec.best["epoch"] == 3  # a full tie goes to the later epoch
    assert rec.best["rule"] == RunRecorder.BEST_EPOCH_RULE and "dev AUROC" in rec.best["rule"]
    assert [row["epoch"] for row in rec.history] == [0, 1, 2, 3]


def test_nan_metrics_never_win_the_best_epoch(tmp_path):
    rec = recorder(tmp_path)
    validate(rec, 0, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], auroc=0.9)
    validate(rec, 1, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], auroc=float("nan"), balanced_accuracy=1.0)
    assert rec.best["epoch"] == 0


class WandbLogger:  # named like Lightning's: the recorder then logs pictures and the run summary to it
    def __init__(self) -> None:
        self.experiment = SimpleNamespace(summary={})


def summarise(rec: RunRecorder, monkeypatch) -> tuple[dict, dict, list[str]]:
    """write_summary with a stand-in W&B logger: (summary.json as read back, the W&B run summary, the names
    of the pictures logged to W&B)."""
    logged: list[str] = []
    monkeypatch.setattr(rec, "_log_wandb", lambda run, files, *rest: logged.extend(f.name for f in files))
    logger = WandbLogger()
    rec.write_summary(SimpleNamespace(logger=logger))
    summary = json.loads((rec.run_dir / "summary.json").read_text())
    return summary, logger.experiment.summary, logged


# dev and val predictions of two epochs; neither set separates the classes, so every temperature is interior
DEV = ([0.2, 0.6, 0.1, 0.7, 0.4, 0.95], [0.3, 0.65, 0.02, 0.9, 0.45, 0.99])
VAL = ([0.1, 0.35, 0.55, 0.8, 0.45, 0.9], [0.05, 0.6, 0.3, 0.97, 0.4, 0.85])


def test_calibration_temperature_is_fitted_on_each_epochs_dev_predictions_and_reported_on_val(tmp_path, monkeypatch):
    rec = recorder(tmp_path)
    validate(rec, 0, VAL[0], auroc=1.0, dev_probs=DEV[0])  # the dev-selected epoch
    validate(rec, 1, VAL[1], auroc=0.7, dev_probs=DEV[1])  # the last epoch
    summary, wandb_summary, logged = summarise(rec, monkeypatch)
    labels = LABELS.numpy()
    calibration = summary["calibration"]
    assert set(calibration) == {"last_epoch", "dev_selected_checkpoint"}
    for name, epoch in (("last_epoch", 1), ("dev_selected_checkpoint", 0)):
        c = calibration[name]
        t = fit_temperature(labels, np.float32(DEV[epoch]))
        assert c["temperature"] == t and 0.01 < t < 100, name
        assert t != fit_temperature(labels, np.float32(VAL[epoch]))  # fitted on dev, not on what is reported
        assert c["fitted_on"].startswith("the dev split (6 photos)")
        assert c["val"] == temperature_report(labels, np.float32(VAL[epoch]), t), name
        assert c["dev"] == temperature_report(labels, np.float32(DEV[epoch]), t), name
        assert c["dev"]["after"]["nll"] <= c["dev"]["before"]["nll"]  # the minimum of the NLL on dev
        assert wandb_summary[f"calibration/{name}/temperature"] == t
        for key in ("ece", "brier", "nll"):
            for when in ("before", "after"):
                assert wandb_summary[f"calibration/{name}/val_{key}_{when}"] == c["val"][when][key], (name, key)
    assert calibration["last_epoch"]["temperature"] != calibration["dev_selected_checkpoint"]["temperature"]
    assert "reliability.png" in summary["pictures"] and "reliability.png" in logged
    with Image.open(tmp_path / "reliability.png") as image:
        assert image.format == "PNG"

    # other val predictions, the same dev ones: the same temperature
    other = recorder(tmp_path / "other")
    validate(other, 0, [1 - p for p in VAL[1]], auroc=1.0, dev_probs=DEV[1])
    assert other.calibration()["last_epoch"]["temperature"] == calibration["last_epoch"]["temperature"]


def test_calibration_without_a_dev_split_fits_nothing(tmp_path, monkeypatch):
    rec = recorder(tmp_path, dev=False, dev_fraction=0.0)
    validate(rec, 0, VAL[0], auroc=float("nan"))
    summary, wandb_summary, logged = summarise(rec, monkeypatch)
    c = summary["calibration"]
    assert set(c) == {"last_epoch"}  # no dev-selected epoch either
    c = c["last_epoch"]
    assert c["temperature"] is None and c["fitted_on"].startswith("nothing") and "no dev split" in c["fitted_on"]
    assert set(c) == {"temperature", "at_bound", "fitted_on", "val"}
    assert c["val"] == temperature_report(LABELS.numpy(), np.float32(VAL[0]), None) and set(c["val"]) == {"before"}
    assert "calibration/last_epoch/temperature" not in wandb_summary  # numbers only
    assert "calibration/last_epoch/val_ece_before" in wandb_summary
    assert not any(key.endswith("_after") for key in wandb_summary)
    assert "reliability.png" in logged and (tmp_path / "reliability.png").is_file()


def test_calibration_with_nan_dev_probabilities_is_nan_and_summary_json_stays_readable(tmp_path, monkeypatch):
    rec = recorder(tmp_path)
    validate(rec, 0, VAL[0], auroc=1.0, dev_probs=[0.2, float("nan"), 0.1, 0.7, 0.4, 0.95])
    summary, wandb_summary, _ = summarise(rec, monkeypatch)
    for name in ("last_epoch", "dev_selected_checkpoint"):
        c = summary["calibration"][name]
        assert math.isnan(c["temperature"]) and "NaN" in c["fitted_on"], name
        assert set(c["val"]) == {"before"} and set(c["dev"]) == {"before"}, name  # nothing scaled
        assert c["val"]["before"] == temperature_report(LABELS.numpy(), np.float32(VAL[0]), None)["before"]
        assert math.isnan(c["dev"]["before"]["ece"]), name
    assert "reliability.png" in summary["pictures"]  # val is finite: drawn, uncalibrated only
