"""Statistics of the case-study table, in NumPy alone (nothing here knows how a run was trained).

Owns: the seed-and-photo bootstrap (`draw` makes the resampling indices, `bootstrap_replicates` and
`bootstrap_interval` use them, on decisions or, for average precision, on scores), the paired difference of
a row to its baseline (`paired_difference`), the metrics vectorised over replicates (`f1_score`, `balanced_accuracy`, `average_precision`) and the no-skill
baseline of a validation set (`no_skill`).

Why both levels are resampled: a table of "mean over 3 seeds" mixes two sources of variance, the training
randomness (initialisation, data order, augmentation: the seed) and the finite validation sample (600
photos). Bouthillier et al., "Accounting for Variance in Machine Learning Benchmarks" (MLSys 2021), show that
intervals from one of them alone are too narrow and recommend randomising both the seeds and the data
(split or bootstrap). Each replicate here therefore draws the seeds with replacement and, for each drawn
seed, that seed's validation photos with replacement; the photos are drawn *within each class*, so every
replicate keeps the validation set's class counts (the balanced prior that F1 and the no-skill F1 depend on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95
METHOD = "seed-and-photo bootstrap (seeds, then each seed's validation photos within each class, with replacement; percentile interval)"

# (labels, predicted positive or a score) of shape (..., photos) -> the metric, of shape (...): F1 and balanced
# accuracy take 0/1 decisions, average precision takes scores (P(positive))
Metric = Callable[[np.ndarray, np.ndarray], np.ndarray]
# photo draws per block of replicates: average precision sorts what it is given, so a table of 3,000-photo
# validation sets is scored a block at a time rather than holding every replicate's copies at once
BLOCK_DRAWS = 2**21


@dataclass(frozen=True)
class Resample:
    """The draws of B replicates over K runs (one run per seed, each with the same class counts).

    `seeds[b, j]` is the run (an index 0..K-1 into the runs given to `draw`) at position j of replicate b;
    `photos[b, j]` are the photo indices drawn for that position, into that run's validation photos: first
    the draws among its positives, then among its negatives. A seed drawn twice in one replicate gets two
    independent photo draws. Everything computed with the same Resample uses exactly the same draws: that is
    what makes a difference between two rows *paired*.
    """

    seeds: np.ndarray  # (B, K) int
    photos: np.ndarray  # (B, K, N) int
    seed: int  # of np.random.default_rng, to reproduce the draws

    @property
    def replicates(self) -> int:
        return int(self.seeds.shape[0])

    @cached_property
    def flat(self) -> np.ndarray:
        """The same draws as indices into a flattened (K, N) array: np.take on them is ~10x faster than
        indexing with (seeds, photos), which keeps a 25-row table at B = 2000 to seconds."""
        return (self.seeds[..., None] * self.photos.shape[-1] + self.photos).astype(np.intp)


@dataclass(frozen=True)
class Difference:
    """A row minus its baseline: the mean over the real seeds and the bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int


@dataclass(frozen=True)
class NoSkill:
    """The all-positive ("all-cat") predictor on a validation set with these class counts."""

    positives: int
    negatives: int
    f1: float
    precision: float
    recall: float
    balanced_accuracy: float
    average_precision: float
    correct_pos: int
    correct_neg: int


def _as_runs(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"labels must be (runs, photos) with at least one of each, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    return labels.astype(np.int8)


def draw(labels: np.ndarray, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> Resample:
    """The resampling indices of `replicates` bootstrap replicates over the runs whose validation labels
    are the rows of `labels` (K runs x N photos, 0/1), from `np.random.default_rng(seed)`.

    The draws depend only on (the labels, replicates, seed), so two rows over the same seeds and photos get
    the same draws wherever they are computed. Every run must have the same class counts (one validation
    set size per data set), so that a replicate is a rectangular array."""
    labels = _as_runs(labels)
    runs, photos = labels.shape
    positives = labels.sum(axis=1)
    if not (positives == positives[0]).all():
        raise ValueError(
            f"every run must have the same validation class counts; positives per run: {positives.tolist()}"
        )
    n_pos = int(positives[0])
    n_neg = photos - n_pos
    order = np.argsort(1 - labels, axis=1, kind="stable")  # each run's positives, then its negatives
    pos_index, neg_index = order[:, :n_pos], order[:, n_pos:]
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, runs, size=(replicates, runs))
    drawn = seeds[..., None]
    parts = []
    for index, count in ((pos_index, n_pos), (neg_index, n_neg)):
        if count:  # a class absent from validation contributes no draws
            parts.append(index[drawn, rng.integers(0, count, size=(replicates, runs, count))])
    chosen = np.concatenate(parts, axis=-1)
    return Resample(seeds, chosen, seed)


def f1_score(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """F1 of the positive class over the last axis; 0 when there is nothing to score (as imbalance.metrics)."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp = (predicted & labels).sum(axis=-1)
    wrong = (predicted != labels).sum(axis=-1)  # fp + fn
    den = 2 * tp + wrong
    return np.divide(2 * tp, den, out=np.zeros(den.shape, dtype=float), where=den > 0)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(recall + specificity) / 2 over the last axis; a class with no photos counts 0 (as imbalance.metrics)."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    pos, neg = labels.sum(axis=-1), (~labels).sum(axis=-1)
    tp, tn = (predicted & labels).sum(axis=-1), (~predicted & ~labels).sum(axis=-1)
    recall = np.divide(tp, pos, out=np.zeros(pos.shape, dtype=float), where=pos > 0)
    specificity = np.divide(tn, neg, out=np.zeros(neg.shape, dtype=float), where=neg > 0)
    return (recall + specificity) / 2


def average_precision(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Average precision over the last axis, equal to sklearn.metrics.average_precision_score: the sum over
    the distinct scores t (descending) of (recall at t - recall at the previous t) * precision at t, tied
    scores counting together. Equivalently (1/P) * sum over the positives of the precision at the end of
    their tie group, which is what is vectorised here. NaN where there is no positive."""
    labels, probs = np.asarray(labels).astype(bool), np.asarray(probs, dtype=float)
    order = np.argsort(-probs, axis=-1, kind="stable")
    scores = np.take_along_axis(probs, order, axis=-1)
    hits = np.take_along_axis(labels, order, axis=-1)
    n = scores.shape[-1]
    precision = np.cumsum(hits, axis=-1) / np.arange(1, n + 1)
    position = np.broadcast_to(np.arange(n), scores.shape)
    ends = np.ones(scores.shape, dtype=bool)  # the last photo of each group of tied scores
    ends[..., :-1] = scores[..., :-1] != scores[..., 1:]
    group_end = np.minimum.accumulate(np.where(ends, position, n)[..., ::-1], axis=-1)[..., ::-1]
    at_end = np.take_along_axis(precision, group_end, axis=-1)
    positives = hits.sum(axis=-1)
    total = (at_end * hits).sum(axis=-1)
    return np.divide(total, positives, out=np.full(positives.shape, np.nan), where=positives > 0)


def _runs_and_predictions(
    labels: np.ndarray, predicted: np.ndarray, resample: Resample
) -> tuple[np.ndarray, np.ndarray]:
    labels, predicted = _as_runs(labels), np.asarray(predicted)
    if not np.issubdtype(predicted.dtype, np.floating):  # decisions; floats are scores (average precision)
        predicted = predicted.astype(bool)
    if predicted.shape != labels.shape:
        raise ValueError(f"predictions {predicted.shape} and labels {labels.shape} must have the same shape")
    if resample.seeds.shape[1] != labels.shape[0] or resample.photos.shape[2] != labels.shape[1]:
        raise ValueError(
            f"the draws are for {resample.seeds.shape[1]} runs of {resample.photos.shape[2]} photos, "
            f"the labels are {labels.shape[0]} x {labels.shape[1]}: draw them from these labels"
        )
    return labels, predicted


def bootstrap_replicates(labels: np.ndarray, predicted: np.ndarray, resample: Resample, metric: Metric) -> np.ndarray:
    """The B replicate values: for each replicate, the metric of each drawn run on its drawn photos, averaged
    over the drawn runs. `labels` and `predicted` are (K runs, N photos), as given to `draw`; `predicted` holds
    what `metric` takes: decisions (F1, balanced accuracy) or float scores (average precision)."""
    labels, predicted = _runs_and_predictions(labels, predicted, resample)
    flat = (
        resample.flat
        if resample.flat.shape == resample.photos.shape
        else resample.seeds[..., None] * labels.shape[1] + resample.photos
    )
    labels, predicted = labels.ravel(), predicted.ravel()
    # replicates per block: each replicate's value depends on its own draws only, so blocks change nothing
    step = max(1, BLOCK_DRAWS // max(1, int(np.prod(flat.shape[1:]))))
    values = [metric(labels.take(part), predicted.take(part)) for part in np.split(flat, range(step, len(flat), step))]
    return np.concatenate(values).mean(axis=1)  # (B, K) -> (B,)


def interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicate values."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(
    labels: np.ndarray, predicted: np.ndarray, resample: Resample, metric: Metric, level: float = DEFAULT_LEVEL
) -> tuple[float, float]:
    """The `level` seed-and-photo bootstrap interval of the seed-averaged metric."""
    return interval(bootstrap_replicates(labels, predicted, resample, metric), level)


def paired_difference(
    labels: np.ndarray,
    predicted: np.ndarray,
    baseline: np.ndarray,
    resample: Resample,
    metric: Metric,
    level: float = DEFAULT_LEVEL,
) -> Difference:
    """Row minus baseline, over the seeds both have: `labels`, `predicted` and `baseline` are (K, N) with
    run k of both trained at the same seed and row i the same photo (the caller checks the photos agree).
    The mean is over the real seeds on all photos; the interval resamples both with the same draws, so the
    seed-to-seed and photo-to-photo variation they share cancels."""
    labels, predicted = _runs_and_predictions(labels, predicted, resample)
    _, baseline = _runs_and_predictions(labels, baseline, resample)
    mean = float((metric(labels, predicted) - metric(labels, baseline)).mean())
    values = bootstrap_replicates(labels, predicted, resample, metric) - bootstrap_replicates(
        labels, baseline, resample, metric
    )
    low, high = interval(values, level)
    return Difference(mean, low, high, int(labels.shape[0]))


def no_skill(positives: int, negatives: int) -> NoSkill:
    """The all-positive predictor: every photo called positive (recall 1, no correct negative). On a balanced
    validation set it scores F1 2/3 and balanced accuracy 1/2: the trivial answer a remedy must beat."""
    if positives < 1 or negatives < 0:
        raise ValueError(
            f"no-skill baseline needs at least one positive, got {positives} positives, {negatives} negatives"
        )
    prevalence = positives / (positives + negatives)
    return NoSkill(
        positives=positives,
        negatives=negatives,
        f1=2 * positives / (2 * positives + negatives),
        precision=prevalence,
        recall=1.0,
        balanced_accuracy=0.5,
        average_precision=prevalence,  # one tie group: precision = prevalence at recall 1
        correct_pos=positives,
        correct_neg=0,
    )
