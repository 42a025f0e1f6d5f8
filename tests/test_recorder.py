"""The run recorder's choices: which epoch is "best" (on dev), which predictions each result set comes from."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from imbalance.config import RunConfig
from imbalance.data import SplitData
from imbalance.metrics import confusion_metrics
from imbalance.recorder import RunRecorder

LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def recorder(tmp_path: Path, **cfg) -> RunRecorder:
    items = [(str(i), int(y)) for i, y in enumerate(LABELS)]
    split = SplitData("test", ("dog", "cat"), [("a", 0), ("b", 1)], items, dev=[(f"d{p}", y) for p, y in items])
    return RunRecorder(tmp_path, RunConfig(**cfg), split, {})


def validate(rec: RunRecorder, epoch: int, probs: list[float], auroc: float, balanced_accuracy: float = 0.5) -> None:
    """One epoch; the dev metrics are given (the rule reads them), the dev predictions equal the val ones."""
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
    module = SimpleNamespace(val_predictions=predictions, dev_predictions=predictions)
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
