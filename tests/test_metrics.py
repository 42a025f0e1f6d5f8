"""Every metric against scikit-learn, including the degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from imbalance.metrics import best_f1_threshold, confusion_metrics, flatten_metrics, make_metrics


def sklearn_metrics(labels, probs, threshold):
    pred = (probs > threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    kw = {"zero_division": 0}
    return {
        "precision": skm.precision_score(labels, pred, **kw),
        "recall": skm.recall_score(labels, pred, **kw),
        "f1": skm.f1_score(labels, pred, **kw),
        "specificity": skm.recall_score(labels, pred, pos_label=0, **kw),
        "accuracy": skm.accuracy_score(labels, pred),
        "balanced_accuracy": (skm.recall_score(labels, pred, **kw) + skm.recall_score(labels, pred, pos_label=0, **kw))
        / 2,
        "macro_f1": skm.f1_score(labels, pred, average="macro", labels=[0, 1], **kw),
        "mcc": skm.matthews_corrcoef(labels, pred),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def cases():
    rng = np.random.default_rng(0)
    labels = (rng.random(301) < 0.1).astype(int)
    probs = np.clip(labels * 0.35 + rng.random(301) * 0.65, 0, 1)
    yield "imbalanced", labels, probs
    yield "balanced", np.array([0, 1] * 50), rng.random(100)
    yield "no positive predictions", labels, probs * 0.1
    yield "all predicted positive", labels, 0.6 + probs * 0.4
    yield "all targets negative", np.zeros(50, int), rng.random(50)
    yield "all targets positive", np.ones(50, int), rng.random(50)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize(("name", "labels", "probs"), list(cases()), ids=[c[0] for c in cases()])
def test_torchmetrics_collection_matches_sklearn(name, labels, probs, threshold):
    collection = make_metrics(threshold)
    for chunk in np.array_split(np.arange(len(labels)), 7):  # several batches, one epoch
        collection.update(torch.tensor(probs[chunk], dtype=torch.float32), torch.tensor(labels[chunk]))
    ours = flatten_metrics(collection.compute())
    expected = sklearn_metrics(labels, probs.astype(np.float32), threshold)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    if 0 < labels.sum() < len(labels):
        assert ours["average_precision"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-5)
        assert ours["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-5)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize(("name", "labels", "probs"), list(cases()), ids=[c[0] for c in cases()])
def test_numpy_confusion_metrics_match_sklearn(name, labels, probs, threshold):
    ours = confusion_metrics(labels, probs, threshold)
    for key, value in sklearn_metrics(labels, probs, threshold).items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_epoch_metrics_do_not_depend_on_batch_size():
    labels, probs = next(iter(cases()))[1:]
    results = []
    for batch in (1, 7, 64, 301):
        collection = make_metrics()
        for start in range(0, len(labels), batch):
            collection.update(torch.tensor(probs[start : start + batch]), torch.tensor(labels[start : start + batch]))
        results.append(flatten_metrics(collection.compute()))
    assert all(r == results[0] for r in results)


def test_flatten_names_correct_counts_after_classes():
    collection = make_metrics().clone(prefix="val/")
    collection.update(torch.tensor([0.9, 0.1, 0.8]), torch.tensor([1, 0, 0]))
    flat = flatten_metrics(collection.compute(), ("dog", "cat"))
    assert flat["val/correct_cat"] == 1 and flat["val/correct_dog"] == 1 and flat["val/fp"] == 1


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(200) < 0.2).astype(int)
    probs = np.round(np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1), 2)  # ties on purpose
    t = best_f1_threshold(labels, probs)
    grid = np.unique(np.concatenate([probs, np.linspace(0, 1, 1001)]))
    brute = max(skm.f1_score(labels, (probs > g).astype(int), zero_division=0) for g in grid)
    assert skm.f1_score(labels, (probs > t).astype(int), zero_division=0) == pytest.approx(brute)
