"""Every metric against scikit-learn (imbalanced-learn for G-mean, NumPy loops for the calibration metrics),
including the degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from imbalance.metrics import (
    BinaryECE,
    best_f1_threshold,
    calibration_metrics,
    confusion_metrics,
    flatten_metrics,
    make_metrics,
)

try:
    from imblearn.metrics import geometric_mean_score
except ImportError:  # imbalanced-learn is a dev extra: fall back to the formula
    geometric_mean_score = None


def g_mean_reference(labels, pred):
    """imbalanced-learn's G-mean where both classes are present; with one class only it scores the class(es)
    it sees, where ours is sqrt(recall * specificity) with the recall of a missing class 0, like sklearn's."""
    if geometric_mean_score is not None and 0 < labels.sum() < len(labels):
        return geometric_mean_score(labels, pred)
    kw = {"zero_division": 0}
    return np.sqrt(skm.recall_score(labels, pred, **kw) * skm.recall_score(labels, pred, pos_label=0, **kw))


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
        "g_mean": g_mean_reference(labels, pred),
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


def brute_force_best_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Best F1 over every prediction set a threshold can make: sort, the top k positive, for each k at which
    the sorted probabilities change (a threshold cannot split a tie)."""
    order = np.argsort(-probs.astype(np.float64), kind="stable")
    p, y = probs[order], labels[order]
    best = 0.0
    for k in range(len(p) + 1):
        if 0 < k < len(p) and p[k - 1] == p[k]:
            continue
        tp, fp = int(y[:k].sum()), int(k - y[:k].sum())
        fn = int(y.sum()) - tp
        best = max(best, 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
    return best


def random_threshold_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and float32 probabilities with exact 0.0 and 1.0, ties and neighbouring float32 values."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    labels = (rng.random(n) < rng.choice([0.0, 0.1, 0.5, 0.9, 1.0])).astype(int)
    kind = seed % 4
    if kind == 0:  # coarse values: many ties, exact 0 and 1
        probs = rng.choice([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], n)
    elif kind == 1:  # a float32 sigmoid: saturates to exactly 0.0 and 1.0
        probs = torch.sigmoid(torch.from_numpy(rng.normal(labels * 40 - 20, 80)).float()).numpy()
    elif kind == 2:  # neighbouring float32 values, whose float64 midpoints round onto one of them
        base = np.float32(rng.random())
        probs = np.array([base] * n, dtype=np.float32)
        for i in range(n):
            for _ in range(int(rng.integers(0, 3))):
                probs[i] = np.nextafter(probs[i], np.float32(1))
    else:
        probs = rng.random(n)
        probs[rng.random(n) < 0.3] = 0.0
        probs[rng.random(n) < 0.2] = 1.0
    return labels, probs.astype(np.float32)


@pytest.mark.parametrize("seed", range(200))
def test_best_threshold_reproduces_the_best_prediction_set(seed):
    labels, probs = random_threshold_case(seed)
    t = best_f1_threshold(labels, probs)
    best = brute_force_best_f1(labels, probs)
    assert confusion_metrics(labels, probs, t)["f1"] == pytest.approx(best, abs=1e-12)
    assert confusion_metrics(labels, probs.astype(np.float64), t)["f1"] == pytest.approx(best, abs=1e-12)


def test_best_threshold_for_everything_positive_is_below_zero_probabilities():
    labels, probs = np.array([1, 1, 0]), np.array([0.0, 0.0, 0.0], dtype=np.float32)
    t = best_f1_threshold(labels, probs)
    assert t < 0  # only then is 0.0 > t: predicting every sample positive (F1 0.8) beats none (F1 0)
    assert confusion_metrics(labels, probs, t)["f1"] == pytest.approx(0.8)
    t = best_f1_threshold(np.array([1, 1, 0]), np.array([0.3, 0.3, 0.3]))
    assert 0 <= t < 0.3 and confusion_metrics(np.array([1, 1, 0]), np.array([0.3, 0.3, 0.3]), t)["f1"] == 0.8


def test_best_threshold_ties_are_broken_toward_one_half():
    # no positives: every prediction set has F1 0, and the midpoint closest to 0.5 wins
    assert best_f1_threshold(np.array([0, 0, 0]), np.array([0.1, 0.45, 0.7])) == pytest.approx(0.575)
    assert best_f1_threshold(np.array([1, 0]), np.array([0.8, 0.2])) == pytest.approx(0.5)


# --- calibration (issue 15): ECE, Brier and stratified Brier scores, against loops written here


def ece_reference(labels, probs, n_bins=15):
    """ECE of P(positive) as an explicit loop over the 15 equal-width bins [k/15, (k+1)/15), the last one
    closed at 1, with the edges rounded to float32 (the probabilities' precision on the device)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    total = 0.0
    for b in range(n_bins):
        lo = float(np.float32(b / n_bins)) if b > 0 else -np.inf
        hi = float(np.float32((b + 1) / n_bins)) if b < n_bins - 1 else np.inf
        in_bin = (p >= lo) & (p < hi)
        if in_bin.any():
            total += in_bin.sum() / len(p) * abs(y[in_bin].mean() - p[in_bin].mean())
    return total


def brier_reference(labels, probs):
    y, p = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)

    def mean(x):
        return x.mean() if x.size else np.nan

    return {
        "ece": ece_reference(y, p),
        "brier": mean((p - y) ** 2),
        "brier_pos": mean((1 - p[y == 1]) ** 2),
        "brier_neg": mean(p[y == 0] ** 2),
    }


def calibration_cases():
    rng = np.random.default_rng(1)
    labels = (rng.random(301) < 0.1).astype(int)
    yield "imbalanced", labels, np.clip(labels * 0.35 + rng.random(301) * 0.65, 0, 1)
    yield "balanced", np.array([0, 1] * 50), rng.random(100)
    yield "all targets negative", np.zeros(50, int), rng.random(50)
    yield "all targets positive", np.ones(50, int), rng.random(50)
    hard = rng.random(60) < 0.3
    yield (
        "hard 0/1 predictions, some wrong",
        hard.astype(int),
        np.where(rng.random(60) < 0.8, hard, ~hard).astype(float),
    )
    edges = np.float32(np.arange(16) / 15)  # exactly on every edge (0.0, 1/15, ..., 1.0) and a neighbour either side
    on_edges = np.concatenate([edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(1))])
    yield "on the bin edges", (rng.random(len(on_edges)) < 0.5).astype(int), np.clip(on_edges, 0, 1)
    z = rng.normal(0, 30, 200)  # a float32 sigmoid that saturates to exactly 0.0 and 1.0
    yield "saturated", (rng.random(200) < 0.2).astype(int), torch.sigmoid(torch.tensor(z, dtype=torch.float32)).numpy()
    yield "constant one half", np.array([0, 0, 0, 1]), np.full(4, 0.5)


CALIBRATION = list(calibration_cases())


def epoch_values(labels, probs, chunks=7):
    collection = make_metrics()
    for chunk in np.array_split(np.arange(len(labels)), min(chunks, len(labels))):  # no empty batch
        collection.update(torch.tensor(probs[chunk], dtype=torch.float32), torch.tensor(labels[chunk]))
    return flatten_metrics(collection.compute())


def assert_same(ours, expected, abs_tol, name=""):
    for key, value in expected.items():
        if np.isnan(value):
            assert np.isnan(ours[key]), (name, key, ours[key])
        else:
            assert ours[key] == pytest.approx(value, abs=abs_tol), (name, key)


@pytest.mark.parametrize(("name", "labels", "probs"), CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_epoch_calibration_metrics_match_numpy_reference(name, labels, probs):
    probs32 = probs.astype(np.float32)  # what the device sees
    expected = brier_reference(labels, probs32)
    assert_same(epoch_values(labels, probs), expected, 1e-6, name)
    assert_same(calibration_metrics(labels, probs32), expected, 1e-12, name)  # the float64 twin, on the same values
    assert skm.brier_score_loss(labels, probs32, pos_label=1) == pytest.approx(expected["brier"])


@pytest.mark.parametrize(("name", "labels", "probs"), CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_calibration_metrics_are_exact_whatever_the_batch_split_and_order(name, labels, probs):
    keys = ("ece", "brier", "brier_pos", "brier_neg")
    order = np.random.default_rng(0).permutation(len(labels))
    results = [
        epoch_values(labels, probs, 1),
        epoch_values(labels, probs, 5),
        epoch_values(labels[order], probs[order], 3),
    ]
    for r in results[1:]:
        for key in keys:  # integer sums: equal to the last bit, NaN (a missing class) included
            assert r[key] == results[0][key] or (np.isnan(r[key]) and np.isnan(results[0][key])), (key, r, results[0])


@pytest.mark.parametrize("seed", range(3))
def test_ece_matches_torchmetrics_binary_calibration_error(seed):
    """torchmetrics' BinaryCalibrationError(15, "l1") is the same ECE of P(positive) vs the label, away from
    exact 1.0 (which it puts in a 16th bin of its own) and from the edges (its float32 linspace)."""
    from torchmetrics.classification import BinaryCalibrationError

    rng = np.random.default_rng(seed)
    labels = torch.tensor((rng.random(500) < 0.15).astype(int))
    probs = torch.tensor(rng.beta(0.5, 2, 500), dtype=torch.float32).clamp(max=0.999)
    reference = BinaryCalibrationError(n_bins=15, norm="l1")(probs, labels)
    assert float(BinaryECE()(probs, labels)) == pytest.approx(float(reference), abs=1e-6)


def test_ece_keeps_probability_one_in_the_last_bin():
    probs, labels = torch.tensor([1.0, 0.95]), torch.tensor([0, 1])
    assert float(BinaryECE()(probs, labels)) == pytest.approx(0.475)  # one bin: |0.5 - 0.975|
    assert ece_reference(labels.numpy(), probs.numpy()) == pytest.approx(0.475)
    from torchmetrics.classification import BinaryCalibrationError

    # torchmetrics: {1.0} alone (|0 - 1| / 2) and [14/15, 1) (|1 - 0.95| / 2)
    assert float(BinaryCalibrationError(n_bins=15)(probs, labels)) == pytest.approx(0.525)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_probabilities_make_calibration_metrics_nan(bad):
    labels = np.array([0, 1, 0, 1])
    probs = np.array([0.1, bad, 0.3, 0.9])
    values = epoch_values(labels, probs, 2)
    for key in ("ece", "brier", "brier_pos", "brier_neg"):
        assert np.isnan(values[key]), key
        assert np.isnan(calibration_metrics(labels, probs)[key]), key
    assert np.isnan(confusion_metrics(labels, probs, 0.5)["g_mean"])


def test_g_mean_of_one_class_targets_is_zero():
    """No positive sample: recall is 0 by convention (as for balanced accuracy's half), so G-mean is 0."""
    labels, probs = np.zeros(5, int), np.array([0.1, 0.2, 0.3, 0.4, 0.6])
    assert confusion_metrics(labels, probs, 0.5)["g_mean"] == 0.0
    assert epoch_values(labels, probs, 2)["g_mean"] == 0.0
