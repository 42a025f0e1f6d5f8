"""The run recorder's choices: which epoch is "best", which predictions each summary row is computed from."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imbalance.config import RunConfig
from imbalance.data import SplitData
from imbalance.metrics import best_f1_threshold, confusion_metrics
from imbalance.recorder import RunRecorder

LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def recorder(tmp_path: Path, **cfg) -> RunRecorder:
    split = SplitData("test", ("dog", "cat"), [("a", 0), ("b", 1)], [(str(i), int(y)) for i, y in enumerate(LABELS)])
    return RunRecorder(tmp_path, RunConfig(**cfg), split, {})


def validate(rec: RunRecorder, epoch: int, probs: list[float], auroc: float) -> None:
    probs_t = torch.tensor(probs)
    f1 = confusion_metrics(LABELS.numpy(), probs_t.numpy(), 0.5)["f1"]
    trainer = SimpleNamespace(
        sanity_checking=False,
        fast_dev_run=True,  # no checkpoint file in this unit test
        current_epoch=epoch,
        callback_metrics={"val/f1": torch.tensor(f1), "val/auroc": torch.tensor(auroc)},
        is_global_zero=True,
    )
    module = SimpleNamespace(val_predictions={"index": torch.arange(6), "label": LABELS, "prob": probs_t})
    rec.on_validation_end(trainer, module)
    rec.on_train_epoch_end(trainer, module)


def test_tuned_threshold_and_posthoc_rows_come_from_the_last_epoch(tmp_path):
    rec = recorder(tmp_path, tune_threshold=True, posthoc_la=1.0)
    good = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]  # epoch 0: F1 1.0, the best epoch
    last = [0.3, 0.45, 0.6, 0.4, 0.55, 0.65]  # epoch 1: what the table reports
    validate(rec, 0, good, auroc=1.0)
    validate(rec, 1, last, auroc=0.7)
    assert rec.best["epoch"] == 0
    rows = rec._thresholds()
    labels = LABELS.numpy()
    for key in ("at_threshold_0.5", "tuned_threshold", "posthoc_logit_adjusted"):
        assert rows[key]["epoch"] == 1, key
    assert rows["at_threshold_0.5"]["f1"] == confusion_metrics(labels, np.array(last), 0.5)["f1"]
    t = best_f1_threshold(labels, np.array(last))
    assert rows["tuned_threshold"]["f1"] == pytest.approx(confusion_metrics(labels, np.array(last), t)["f1"])
    assert rows["tuned_threshold"]["f1"] < 1.0  # not the best epoch's perfect ranking


def test_best_epoch_ties_on_f1_are_broken_by_auroc_then_the_later_epoch(tmp_path):
    rec = recorder(tmp_path)
    nothing = [0.1] * 6  # F1 = 0 in every epoch: a plain-CE collapse
    validate(rec, 0, nothing, auroc=0.5)
    validate(rec, 1, nothing, auroc=0.8)
    validate(rec, 2, nothing, auroc=0.6)
    assert rec.best["epoch"] == 1  # not epoch 0
    validate(rec, 3, nothing, auroc=0.8)
    assert rec.best["epoch"] == 3  # a full tie goes to the later epoch
    assert rec.best["rule"] == RunRecorder.BEST_EPOCH_RULE
    assert [row["epoch"] for row in rec.history] == [0, 1, 2, 3]


def test_nan_metrics_never_win_the_best_epoch(tmp_path):
    rec = recorder(tmp_path)
    validate(rec, 0, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], auroc=1.0)
    validate(rec, 1, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], auroc=float("nan"))
    assert rec.best["epoch"] == 0
