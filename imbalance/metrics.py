"""Epoch metrics of the positive class, built on torchmetrics.

One `MetricCollection` is made per stage (`make_metrics().clone(prefix="val/")`); its states are summed
over the whole epoch and across DDP ranks, so every value is exact for the epoch, never a mean of batches.
The threshold metrics share one set of confusion counts (torchmetrics' compute groups).

Calibration (GitHub issue 15): `ece`, `brier`, `brier_pos`, `brier_neg` need no threshold; they are defined
on P(positive) against the 0/1 label (see `BinaryECE` and `BinaryBrierScore`), with `calibration_metrics`
their NumPy twin. `g_mean` sits beside `balanced_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
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


class BinaryGMean(BinaryStatScores):
    """Geometric mean of recall and specificity, sqrt(TP/(TP+FN) * TN/(TN+FP)): imbalanced-learn's
    geometric_mean_score of a binary problem (with both classes present). A class with no sample has recall 0
    (the `_safe_div` convention of the other metrics), so G-mean is 0 when the targets hold one class only."""

    def compute(self) -> Tensor:
        tp, fp, tn, fn = self._final_state()
        return torch.sqrt(_safe_div(tp, tp + fn) * _safe_div(tn, tn + fp))


ECE_BINS = 15  # the long-tail papers' (and Guo et al.'s) number of equal-width bins


def calibration_bin_edges(n_bins: int = ECE_BINS) -> np.ndarray:
    """The inner edges k / n_bins (k = 1 .. n_bins - 1) of the equal-width bins, as float32 values (returned as
    float64, exactly): bin b is [edge_b, edge_{b+1}), the last one closed, [edge_{n-1}, 1]. The edges are
    rounded to float32 once so that the epoch metric (float32 probabilities on the device) and the NumPy twin
    (the same probabilities read back as float64) put every sample in the same bin, edges included."""
    return np.array([k / n_bins for k in range(1, n_bins)], dtype=np.float32).astype(np.float64)


# The calibration metrics sum probabilities as integers, in units of 2^-32 (each value rounded to the nearest
# unit once, an error below 1.2e-10 per sample): integer sums are exact, so an epoch's value does not depend on
# how it was split into batches or ranks, and need no float64 (which MPS lacks). Room for 2^31 samples.
_UNIT = 2.0**32


def _quantize(x: Tensor) -> Tensor:
    """x in [0, 1] as an integer number of 2^-32 units (x * 2^32 is exact in float32; rounding drops only what
    lies below one unit)."""
    return torch.round(x * _UNIT).long()


def _nonfinite_count(p: Tensor) -> tuple[Tensor, Tensor]:
    """(p with non-finite values replaced by 0, the number replaced): a NaN or inf has no integer units."""
    finite = torch.isfinite(p)
    return torch.where(finite, p, torch.zeros_like(p)), (~finite).sum()


def _nan_unless(ok: bool, value: Tensor) -> Tensor:
    return value if ok else torch.full_like(value, float("nan"))


class BinaryECE(Metric):
    """Expected calibration error of P(positive), over `n_bins` equal-width bins of [0, 1]:

        ECE = sum_b (n_b / N) |mean(y in b) - mean(p in b)| = sum_b |sum(y in b) - sum(p in b)| / N,

    p the predicted P(positive) and y the 0/1 label: the reliability of the positive-class probability
    (sklearn's calibration_curve, binned), *not* the top-label confidence max(p, 1 - p) vs accuracy that the
    multiclass papers bin. This is what torchmetrics' BinaryCalibrationError(n_bins, norm="l1") computes for
    binary inputs (its "confidences" are the probabilities themselves, its "accuracies" the targets), with two
    differences, the reasons to have this class: its bins are torch.bucketize(right=True) over n_bins + 1
    edges, so a probability of exactly 1.0 (a saturated float32 sigmoid) gets a bin of its own instead of the
    last one; and it keeps every prediction (states gathered with "cat"), where these states are per-bin sums,
    O(n_bins), integer and exact under DDP (`dist_reduce_fx="sum"`) whatever the batch split. Bins:
    `calibration_bin_edges`, probabilities compared in float32. A non-finite probability makes the value NaN;
    no sample, NaN."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = ECE_BINS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = int(n_bins)
        # a plain attribute, not a buffer: DDP would broadcast a buffer at every forward
        self._edges = torch.tensor(calibration_bin_edges(self.n_bins), dtype=torch.float32)
        self.add_state("count", torch.zeros(self.n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("positives", torch.zeros(self.n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("prob_units", torch.zeros(self.n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, bad = _nonfinite_count(preds.detach().float().flatten())
        y = (target.detach().flatten() == 1).long()
        if self._edges.device != p.device:
            self._edges = self._edges.to(p.device)
        bins = torch.bucketize(p, self._edges, right=True).clamp_(0, self.n_bins - 1)
        self.count.scatter_add_(0, bins, torch.ones_like(bins))
        self.positives.scatter_add_(0, bins, y)
        self.prob_units.scatter_add_(0, bins, _quantize(p))
        self.nonfinite += bad

    def compute(self) -> Tensor:
        total = self.count.sum()
        gap = (self.positives * int(_UNIT) - self.prob_units).abs().sum()  # exact, in units
        value = gap.float() / _UNIT / total.clamp(min=1).float()
        return _nan_unless(bool(total > 0) and not bool(self.nonfinite > 0), value)


class _BinaryBrierStates(Metric):
    """Sums of (p - y)^2 (in 2^-32 units, exact) and counts within each class, summed over batches and ranks."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("sq_pos", "sq_neg", "n_pos", "n_neg", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, bad = _nonfinite_count(preds.detach().float().flatten())
        positive = target.detach().flatten() == 1
        sq = _quantize((p - positive.float()) ** 2)
        zero = torch.zeros_like(sq)
        self.sq_pos += torch.where(positive, sq, zero).sum()  # no boolean indexing: no host sync per batch
        self.sq_neg += torch.where(positive, zero, sq).sum()
        self.n_pos += positive.sum()
        self.n_neg += (~positive).sum()
        self.nonfinite += bad

    def _mean(self, units: Tensor, n: Tensor) -> Tensor:
        value = units.float() / _UNIT / n.clamp(min=1).float()
        return _nan_unless(bool(n > 0) and not bool(self.nonfinite > 0), value)


class BinaryBrierScore(_BinaryBrierStates):
    """Brier score mean((p - y)^2) of P(positive) p against the 0/1 label y (sklearn's brier_score_loss).
    NaN without samples or with a non-finite probability."""

    def compute(self) -> Tensor:
        return self._mean(self.sq_pos + self.sq_neg, self.n_pos + self.n_neg)


class BinaryClassBrierScore(_BinaryBrierStates):
    """Stratified Brier score (Wallace & Dahabreh, "Class probability estimates are unreliable for imbalanced
    data (and how to fix them)", ICDM 2012): the Brier score within one class, mean((1 - p)^2) over the
    positives (`positive=True`, brier_pos) or mean(p^2) over the negatives (brier_neg). On imbalanced data the
    overall Brier score is dominated by the majority class; brier_pos shows how badly the minority is served.
    NaN when the class has no sample (undefined; 0 would read as perfect) or a probability is not finite."""

    def __init__(self, positive: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positive = bool(positive)

    def compute(self) -> Tensor:
        return self._mean(self.sq_pos, self.n_pos) if self.positive else self._mean(self.sq_neg, self.n_neg)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def make_metrics(threshold: float = 0.5) -> MetricCollection:
    """Metrics over P(positive) and integer targets. `stat_scores` holds [tp, fp, tn, fn, support]; `ece`,
    `brier`, `brier_pos` and `brier_neg` do not depend on the threshold."""
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
            "g_mean": BinaryGMean(threshold=t),
            "stat_scores": BinaryStatScores(threshold=t),
            "average_precision": BinaryAveragePrecision(),
            "auroc": BinaryAUROC(),
            "ece": BinaryECE(n_bins=ECE_BINS),
            "brier": BinaryBrierScore(),
            "brier_pos": BinaryClassBrierScore(positive=True),
            "brier_neg": BinaryClassBrierScore(positive=False),
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
        keys = ("precision", "recall", "f1", "specificity", "accuracy", "balanced_accuracy", "g_mean", "macro_f1")
        keys += ("mcc",)
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
        "g_mean": math.sqrt(recall * specificity),
        "macro_f1": (div(2 * tp, 2 * tp + fp + fn) + f1_neg) / 2,
        "mcc": div(tp * tn - fp * fn, mcc_den),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of P(positive) (`calibration_bin_edges`): "count", "positives" (labels that are 1)
    and "prob_sum" (sum of the probabilities), the states of `BinaryECE`; for ECE and reliability diagrams."""
    labels = np.asarray(labels).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    bins = np.searchsorted(calibration_bin_edges(n_bins), probs, side="right")
    return {
        "count": np.bincount(bins, minlength=n_bins),
        "positives": np.bincount(bins, weights=labels, minlength=n_bins),
        "prob_sum": np.bincount(bins, weights=probs, minlength=n_bins),
    }


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of P(positive) over `n_bins` equal-width bins, the definition of `BinaryECE`; NaN for no sample or
    a non-finite probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.size == 0 or not np.isfinite(probs).all():
        return float("nan")
    b = calibration_bins(labels, probs, n_bins)
    return float(np.abs(b["positives"] - b["prob_sum"]).sum() / probs.size)


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float]:
    """`ece`, `brier`, `brier_pos`, `brier_neg` of (labels, P(positive)) in NumPy (float64), the definitions of
    `make_metrics`' BinaryECE, BinaryBrierScore and BinaryClassBrierScore: no threshold involved. Every value
    is NaN when a probability is not finite; a class-wise Brier score is NaN when the class has no sample."""
    labels = np.asarray(labels).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    keys = ("ece", "brier", "brier_pos", "brier_neg")
    if not np.isfinite(probs).all():
        return dict.fromkeys(keys, float("nan"))
    sq = (probs - labels) ** 2

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {
        "ece": expected_calibration_error(labels, probs, n_bins),
        "brier": mean(sq),
        "brier_pos": mean(sq[labels == 1]),
        "brier_neg": mean(sq[labels == 0]),
    }


def best_f1_threshold(labels: np.ndarray, probs: np.ndarray, class_weights: tuple[float, float] | None = None) -> float:
    """The threshold t maximising F1 of the predictions `probs > t`, the rule of `confusion_metrics`.

    `class_weights` (negative, positive) weight every sample of a class, so F1 is computed from weighted
    counts, 2 w1 TP / (2 w1 TP + w0 FP + w1 FN): with `prior_weights` this is F1 on a set with another class
    prior (the set the threshold will be applied to), estimated from these samples.

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
    w_neg, w_pos = (1.0, 1.0) if class_weights is None else (float(class_weights[0]), float(class_weights[1]))
    best_t, best_f1 = 0.5, -1.0
    for t, n_negative in candidates:
        tp = positives - int(positives_below[n_negative])
        fp = len(probs) - n_negative - tp
        fn = positives - tp
        tp, fp, fn = w_pos * tp, w_neg * fp, w_pos * fn
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


def prior_weights(counts: Sequence[int], target_counts: Sequence[int]) -> tuple[float, float]:
    """Per-class weights (negative, positive) that give samples drawn with class `counts` the class prior of
    `target_counts`: w_c = pi_target_c / pi_c. Used to tune a threshold on the dev split (the training prior,
    e.g. 1:22) for the validation set it is applied to (the lecture's is balanced)."""
    counts, target = np.asarray(counts, dtype=np.float64), np.asarray(target_counts, dtype=np.float64)
    if (counts <= 0).any() or (target <= 0).any():
        return (1.0, 1.0)  # a class missing on either side: no prior to correct to
    w = (target / target.sum()) / (counts / counts.sum())
    return float(w[0]), float(w[1])


POSTHOC_TAUS = tuple(round(0.1 * i, 1) for i in range(31))  # 0, 0.1, ..., 3: the dev split picks one


def posthoc_threshold(tau: float, train_counts: Sequence[int]) -> float:
    """Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) of a
    two-class model as a threshold on P(positive): predicting the positive class when the adjusted logit
    z - tau log(pi_1 / pi_0) is above 0 is predicting it when P(positive) > sigmoid(tau log(pi_1 / pi_0)),
    with pi the training class prior."""
    n_neg, n_pos = (float(c) for c in train_counts)
    return float(1 / (1 + np.exp(-tau * (np.log(n_pos) - np.log(n_neg)))))


def best_posthoc_tau(
    labels: np.ndarray, probs: np.ndarray, train_counts: Sequence[int], taus: Sequence[float] = POSTHOC_TAUS
) -> float:
    """The tau of `taus` whose post-hoc adjustment (`posthoc_threshold`) gives the highest balanced accuracy on
    (labels, probs), the dev split's: balanced error is what logit adjustment targets, and it does not depend
    on the class prior, so no reweighting is needed. Ties go to the tau nearest 1 (the paper's default)."""
    best_tau, best_score = 1.0, -1.0
    for tau in sorted(taus, key=lambda t: (abs(t - 1), t)):
        score = confusion_metrics(labels, probs, posthoc_threshold(tau, train_counts))["balanced_accuracy"]
        if score > best_score + 1e-12:
            best_tau, best_score = float(tau), score
    return best_tau


def ranking_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Average precision and AUROC of P(positive) (scikit-learn's definitions, as torchmetrics'); NaN when a
    class is missing or a probability is not finite."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    if not (0 < labels.sum() < len(labels)) or not np.isfinite(probs).all():
        return {"average_precision": float("nan"), "auroc": float("nan")}
    return {
        "average_precision": float(average_precision_score(labels, probs)),
        "auroc": float(roc_auc_score(labels, probs)),
    }


def dev_decisions(
    val: dict[str, np.ndarray],
    dev: dict[str, np.ndarray] | None,
    train_counts: list[int],
    fixed_tau: float | None = None,
    target: str = "the validation set",
) -> dict[str, dict[str, Any]]:
    """The decision rules of one model, read from its dev predictions only (`dev`: {"label", "prob"}, None
    without a dev split), as {"dev_tuned_threshold" | "posthoc_la": {"threshold", "chosen_by", ...}}: the
    threshold tuned for F1 with the dev samples weighted to the reported set's class prior, and the post-hoc
    logit-adjustment tau (tuned on dev, or `fixed_tau`). Of `val`, the set the rules will be applied to, only
    the class counts are read (the prior the threshold is corrected to), never a prediction."""
    out: dict[str, dict[str, Any]] = {}
    if dev is not None and len(dev["label"]):
        dev_counts = [int((dev["label"] == 0).sum()), int((dev["label"] == 1).sum())]
        val_counts = [int((val["label"] == 0).sum()), int((val["label"] == 1).sum())]
        weights = prior_weights(dev_counts, val_counts)
        t = best_f1_threshold(dev["label"], dev["prob"], weights)
        corrected = min(dev_counts) > 0 and min(val_counts) > 0
        out["dev_tuned_threshold"] = {
            "threshold": t,
            "chosen_by": (
                f"the threshold maximising F1 on the dev split, its samples weighted to {target}'s class prior "
                f"(weights negative {weights[0]:.4g}, positive {weights[1]:.4g})"
                if corrected
                else "the threshold maximising F1 on the dev split, uncorrected (a class is missing on dev or in "
                f"{target}, so there is no prior to correct to)"
            ),
            "dev_prior_threshold": best_f1_threshold(dev["label"], dev["prob"]),  # uncorrected, for comparison
        }
    if fixed_tau is not None:
        tau, rule = fixed_tau, f"tau fixed by --posthoc-la {fixed_tau:g} (not tuned)"
    elif dev is not None and len(dev["label"]):
        tau = best_posthoc_tau(dev["label"], dev["prob"], train_counts)
        rule = f"tau maximising dev balanced accuracy over {POSTHOC_TAUS[0]:g}, {POSTHOC_TAUS[1]:g}, ..., {POSTHOC_TAUS[-1]:g}"
    else:
        return out
    out["posthoc_la"] = {"threshold": posthoc_threshold(tau, train_counts), "tau": tau, "chosen_by": rule}
    return out


def scored_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold and ranking metrics of reported predictions, compared in float64 (as the case study reads
    them back from predictions.csv, where the float32 probabilities are written exactly)."""
    probs = np.asarray(probs, dtype=np.float64)
    return {**confusion_metrics(labels, probs, threshold), **ranking_metrics(labels, probs)}
