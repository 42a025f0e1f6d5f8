"""imbalance.stats against references written here with plain loops over the same drawn indices, and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score
from sklearn.metrics import f1_score as sk_f1

from imbalance import stats

# a small fixed table: 3 seeds x 8 photos (4 cats, 4 dogs, in a different order at each seed)
LABELS = np.array(
    [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 0, 1, 0, 1, 0, 1],
        [1, 0, 0, 1, 1, 0, 0, 1],
    ]
)
ROW = np.array(
    [
        [1, 1, 0, 1, 0, 1, 0, 0],
        [0, 1, 0, 0, 0, 1, 1, 1],
        [1, 0, 1, 1, 1, 0, 0, 0],
    ],
    dtype=bool,
)
BASE = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 1],
    ],
    dtype=bool,
)


def loop_f1(labels: list[int], predicted: list[bool]) -> float:
    tp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 1 and p)
    fp = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 0 and p)
    fn = sum(1 for y, p in zip(labels, predicted, strict=True) if y == 1 and not p)
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0


def loop_balanced_accuracy(labels: list[int], predicted: list[bool]) -> float:
    pos = [p for y, p in zip(labels, predicted, strict=True) if y == 1]
    neg = [p for y, p in zip(labels, predicted, strict=True) if y == 0]
    recall = sum(pos) / len(pos) if pos else 0.0
    specificity = sum(not p for p in neg) / len(neg) if neg else 0.0
    return (recall + specificity) / 2


def loop_replicates(labels, predicted, resample: stats.Resample, metric) -> list[float]:
    """For each replicate: each drawn seed's metric on its drawn photos, averaged over the drawn seeds."""
    values = []
    for b in range(resample.replicates):
        per_seed = []
        for j in range(resample.seeds.shape[1]):
            k = int(resample.seeds[b, j])
            photos = [int(i) for i in resample.photos[b, j]]
            per_seed.append(metric([int(labels[k][i]) for i in photos], [bool(predicted[k][i]) for i in photos]))
        values.append(sum(per_seed) / len(per_seed))
    return values


def test_draws_are_seeded_stratified_and_reproducible():
    resample = stats.draw(LABELS, replicates=50, seed=7)
    again = stats.draw(LABELS, replicates=50, seed=7)
    assert np.array_equal(resample.seeds, again.seeds) and np.array_equal(resample.photos, again.photos)
    assert not np.array_equal(resample.photos, stats.draw(LABELS, replicates=50, seed=8).photos)
    assert resample.seeds.shape == (50, 3) and resample.photos.shape == (50, 3, 8) and resample.seed == 7
    # reproduce them from the documented order of the generator's calls
    rng = np.random.default_rng(7)
    seeds = rng.integers(0, 3, size=(50, 3))
    pos_rank, neg_rank = rng.integers(0, 4, size=(50, 3, 4)), rng.integers(0, 4, size=(50, 3, 4))
    assert np.array_equal(seeds, resample.seeds)
    for b in range(50):
        for j in range(3):
            k = seeds[b, j]
            positives, negatives = np.flatnonzero(LABELS[k] == 1), np.flatnonzero(LABELS[k] == 0)
            expected = [*positives[pos_rank[b, j]], *negatives[neg_rank[b, j]]]
            assert resample.photos[b, j].tolist() == expected
            assert LABELS[k][resample.photos[b, j]].tolist() == [1] * 4 + [0] * 4  # the class counts are kept


def test_bootstrap_interval_equals_a_loop_reference():
    resample = stats.draw(LABELS, replicates=300, seed=3)
    for metric, reference in ((stats.f1_score, loop_f1), (stats.balanced_accuracy, loop_balanced_accuracy)):
        expected = loop_replicates(LABELS, ROW, resample, reference)
        assert np.allclose(stats.bootstrap_replicates(LABELS, ROW, resample, metric), expected, atol=1e-12)
        low, high = stats.bootstrap_interval(LABELS, ROW, resample, metric)
        assert (low, high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-12)
        assert low <= high


def test_paired_difference_equals_a_loop_reference():
    resample = stats.draw(LABELS, replicates=300, seed=3)
    diff = stats.paired_difference(LABELS, ROW, BASE, resample, stats.f1_score)
    real = [loop_f1(list(LABELS[k]), list(ROW[k])) - loop_f1(list(LABELS[k]), list(BASE[k])) for k in range(3)]
    assert diff.mean == pytest.approx(sum(real) / 3, abs=1e-12) and diff.seeds == 3
    row = loop_replicates(LABELS, ROW, resample, loop_f1)
    base = loop_replicates(LABELS, BASE, resample, loop_f1)  # the same draws for both: paired
    expected = np.percentile([r - b for r, b in zip(row, base, strict=True)], [2.5, 97.5])
    assert (diff.low, diff.high) == pytest.approx(tuple(expected), abs=1e-12)
    same = stats.paired_difference(LABELS, ROW, ROW, resample, stats.f1_score)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)  # a row against itself differs by nothing


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(20, 50))
    labels[:, 0], labels[:, 1] = 1, 0
    probs = np.round(rng.random((20, 50)), 1)  # many ties
    predicted = probs > 0.45
    assert np.allclose(stats.f1_score(labels, predicted), [sk_f1(y, p) for y, p in zip(labels, predicted, strict=True)])
    expected_ba = [balanced_accuracy_score(y, p) for y, p in zip(labels, predicted, strict=True)]
    assert np.allclose(stats.balanced_accuracy(labels, predicted), expected_ba)
    expected_ap = [average_precision_score(y, p) for y, p in zip(labels, probs, strict=True)]
    assert np.allclose(stats.average_precision(labels, probs), expected_ap, atol=1e-12)
    assert stats.average_precision(labels[0], probs[0]) == pytest.approx(expected_ap[0], abs=1e-12)
    assert np.isnan(stats.average_precision(np.zeros(4), np.arange(4.0)))  # no positive: AP is undefined
    assert stats.f1_score(np.zeros(3), np.zeros(3, dtype=bool)) == 0.0  # nothing to score: 0, as imbalance.metrics


def test_no_skill_is_the_all_cat_predictor():
    ns = stats.no_skill(300, 300)
    assert ns.f1 == pytest.approx(2 / 3) and round(ns.f1, 3) == 0.667
    assert (ns.precision, ns.recall, ns.balanced_accuracy, ns.average_precision) == (0.5, 1.0, 0.5, 0.5)
    assert (ns.correct_pos, ns.correct_neg) == (300, 0)
    labels = np.array([1] * 300 + [0] * 300)  # the same numbers from the metrics on an all-cat prediction
    assert stats.f1_score(labels, np.ones(600, dtype=bool)) == pytest.approx(ns.f1)
    assert stats.balanced_accuracy(labels, np.ones(600, dtype=bool)) == 0.5
    assert stats.average_precision(labels, np.full(600, 0.9)) == pytest.approx(ns.average_precision)
    skewed = stats.no_skill(100, 300)
    assert skewed.f1 == pytest.approx(200 / 500) and skewed.average_precision == 0.25


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same validation class counts"):
        stats.draw(np.array([[1, 1, 0, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="draw them from these labels"):
        stats.bootstrap_interval(LABELS[:2], ROW[:2], stats.draw(LABELS, 10), stats.f1_score)
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1"):
        stats.draw(np.array([[2, 0]]))
