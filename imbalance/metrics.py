"""Epoch metrics of the positive class, built on torchmetrics.

One `MetricCollection` is made per stage (`make_metrics().clone(prefix="val/")`); its states are summed
over the whole epoch and across DDP ranks, so every value is exact for the epoch, never a mean of batches.
The threshold metrics share one set of confusion counts (torchmetrics' compute groups).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    BinaryStatScores,
)


class BinaryBalancedAccuracy(BinaryStatScores):
    """Mean of recall and specificity, (TP/(TP+FN) + TN/(TN+FP)) / 2: sklearn's balanced_accuracy_score."""

    def compute(self) -> Tensor:
        tp, fp, tn, fn = self._final_state()
        recall = _safe_div(tp, tp + fn)
        specificity = _safe_div(tn, tn + fp)
        return (recall + specificity) / 2


class BinaryMacroF1(BinaryStatScores):
    """Unweighted mean of the F1 of each class (negative class F1 from TN, FN, FP); sklearn's f1 'macro'."""

    def compute(self) -> Tensor:
        tp, fp, tn, fn = self._final_state()
        f1_pos = _safe_div(2 * tp, 2 * tp + fp + fn)
        f1_neg = _safe_div(2 * tn, 2 * tn + fn + fp)
        return (f1_pos + f1_neg) / 2


class BinaryMCC(BinaryStatScores):
    """Matthews correlation (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when any factor is 0.

    Defined like scikit-learn's matthews_corrcoef; torchmetrics' own version returns a small non-zero
    value in that degenerate case (e.g. a model that predicts only the negative class).
    """

    def compute(self) -> Tensor:
        tp, fp, tn, fn = (x.double() for x in self._final_state())
        den = torch.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return torch.where(den > 0, (tp * tn - fp * fn) / den.clamp(min=1e-300), torch.zeros_like(den)).float()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def make_metrics(threshold: float = 0.5) -> MetricCollection:
    """Metrics over P(positive) and integer targets. `stat_scores` holds [tp, fp, tn, fn, support]."""
    t = threshold
    return MetricCollection(
        {
            "precision": BinaryPrecision(threshold=t),
            "recall": BinaryRecall(threshold=t),
            "f1": BinaryF1Score(threshold=t),
            "specificity": BinarySpecificity(threshold=t),
            "accuracy": BinaryAccuracy(threshold=t),
            "balanced_accuracy": BinaryBalancedAccuracy(threshold=t),
            "macro_f1": BinaryMacroF1(threshold=t),
            "mcc": BinaryMCC(threshold=t),
            "stat_scores": BinaryStatScores(threshold=t),
            "average_precision": BinaryAveragePrecision(),
            "auroc": BinaryAUROC(),
        }
    )


def flatten_metrics(values: dict[str, Tensor], class_names: tuple[str, str] | None = None) -> dict[str, float]:
    """Scalars for loggers: the stat-scores vector becomes tp/fp/tn/fn, plus the lecture's "correct
    cats/dogs" (TP and TN) named after the classes."""
    flat: dict[str, float] = {}
    for name, value in values.items():
        if name.endswith("stat_scores"):
            prefix = name[: -len("stat_scores")]
            tp, fp, tn, fn = (float(v) for v in value[:4])
            flat.update({f"{prefix}tp": tp, f"{prefix}fp": fp, f"{prefix}tn": tn, f"{prefix}fn": fn})
            if class_names is not None:
                flat[f"{prefix}correct_{class_names[1]}"] = tp
                flat[f"{prefix}correct_{class_names[0]}"] = tn
        else:
            flat[name] = float(value)
    return flat


def confusion_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """All threshold metrics from (labels, P(positive)) at one threshold, in NumPy: for threshold tuning
    and evaluation, where the predictions are already on the host. Same definitions as `make_metrics`.

    Probabilities that are NaN or infinite (a diverged model) make every value NaN: a NaN is "not above the
    threshold", so counting it as a negative would report a broken model's numbers as if they were real."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs)
    if probs.size and not np.isfinite(probs.astype(np.float64)).all():
        keys = ("precision", "recall", "f1", "specificity", "accuracy", "balanced_accuracy", "macro_f1", "mcc")
        keys += ("tp", "fp", "tn", "fn")
        return {"threshold": float(threshold), **dict.fromkeys(keys, float("nan"))}
    pred = (probs > threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())

    def div(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision, recall, specificity = div(tp, tp + fp), div(tp, tp + fn), div(tn, tn + fp)
    f1_neg = div(2 * tn, 2 * tn + fn + fp)
    mcc_den = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "specificity": specificity,
        "accuracy": div(tp + tn, len(labels)),
        "balanced_accuracy": (recall + specificity) / 2,
        "macro_f1": (div(2 * tp, 2 * tp + fp + fn) + f1_neg) / 2,
        "mcc": div(tp * tn - fp * fn, mcc_den),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def best_f1_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold t maximising F1 of the predictions `probs > t`, the rule of `confusion_metrics`.

    Every prediction set a threshold can make is tried (the top k probabilities positive, for each k where
    the sorted distinct probabilities change); ties in F1 are broken toward 0.5. The returned t makes exactly
    the best set under `probs > t`, compared in float64 or in the probabilities' own dtype (NumPy compares a
    float32 array with a Python float in float32):
    - between two probabilities, t is their midpoint, or the lower of the two where the midpoint is not
      strictly between them in that precision (neighbouring float32 values);
    - "everything negative": t is the largest probability;
    - "everything positive": t is half the smallest probability, and *below 0* (t = -0.5) when the smallest
      probability is exactly 0.0 (a float32 sigmoid of a logit below about -104), so that 0.0 > t.
    Non-finite probabilities have no best threshold: NaN (and `confusion_metrics` then reports NaN).
    """
    labels = np.asarray(labels).astype(int)
    raw = np.asarray(probs)
    dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.dtype(np.float64)
    probs = raw.astype(np.float64)
    if probs.size == 0:
        return 0.5
    if not np.isfinite(probs).all():
        return float("nan")
    distinct = np.unique(probs)  # ascending; set j predicts positive for probs > distinct[j]
    lowest = distinct[0]
    below = 0.0 if lowest > 0 else lowest - 1.0  # a value under every probability, for "everything positive"
    if not below < lowest:  # |lowest| too large for - 1.0 to change it
        below = -np.inf
    # (threshold, number predicted negative): everything positive, each gap between distinct values, none
    candidates = [(_strictly_between(below, lowest, dtype), 0)]
    negatives = np.searchsorted(np.sort(probs), distinct, side="right")
    for j in range(len(distinct) - 1):
        candidates.append((_strictly_between(distinct[j], distinct[j + 1], dtype), int(negatives[j])))
    candidates.append((float(distinct[-1]), len(probs)))
    order = np.argsort(probs, kind="stable")
    positives_below = np.concatenate([[0], np.cumsum(labels[order])])  # positives among the k lowest
    positives = int(labels.sum())
    best_t, best_f1 = 0.5, -1.0
    for t, n_negative in candidates:
        tp = positives - int(positives_below[n_negative])
        fp = len(probs) - n_negative - tp
        fn = positives - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
            best_t, best_f1 = float(t), f1
    return best_t


def _strictly_between(low: float, high: float, dtype: np.dtype) -> float:
    """A threshold t with low <= t < high under `>` in float64 and in `dtype`: the midpoint when it lies
    strictly between them in both precisions, else `low` itself (then `high > t` and not `low > t`)."""
    mid = (low + high) / 2
    if low < mid < high and dtype.type(low) < dtype.type(mid) < dtype.type(high):
        return float(mid)
    return float(low)
