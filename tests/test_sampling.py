"""Resampling: class counts as imbalanced-learn's samplers give them, determinism, exact DDP shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from imbalance.sampling import EpochSampler

LABELS = [0] * 110 + [1] * 10  # imbalanced-1 in miniature


@pytest.mark.parametrize(("mode", "reference"), [("over", RandomOverSampler), ("under", RandomUnderSampler)])
@pytest.mark.parametrize("labels", [LABELS, [1] * 37 + [0] * 5, [0, 1] * 20])
def test_class_counts_match_imbalanced_learn(mode, reference, labels):
    x = np.arange(len(labels))[:, None]
    _, y_ref = reference(random_state=0).fit_resample(x, np.array(labels))
    draw = EpochSampler(labels, mode, seed=0).draw(0)
    assert Counter(np.array(labels)[draw].tolist()) == Counter(y_ref.tolist())


def test_oversampling_keeps_every_original_and_undersampling_every_minority():
    over = EpochSampler(LABELS, "over", seed=0).draw(0)
    assert set(range(120)) <= set(over.tolist())
    under = EpochSampler(LABELS, "under", seed=0).draw(0)
    assert set(range(110, 120)) <= set(under.tolist()) and len(set(under.tolist())) == len(under) == 20


@pytest.mark.parametrize("mode", ["none", "over", "under"])
def test_draw_depends_on_seed_and_epoch_only(mode):
    a, b = EpochSampler(LABELS, mode, seed=1), EpochSampler(LABELS, mode, seed=1)
    assert np.array_equal(a.draw(3), b.draw(3))
    assert not np.array_equal(a.draw(3), a.draw(4))
    assert not np.array_equal(a.draw(3), EpochSampler(LABELS, mode, seed=2).draw(3))
    a.set_epoch(5)
    assert [i for i, _ in a] == a.draw(5).tolist() and len(a) == len(a.draw(5))
    b.set_epoch(5)
    assert list(a) == list(b)  # indices and augmentation seeds


def test_oversampled_copies_get_distinct_augmentation_seeds_that_shards_share():
    single = EpochSampler(LABELS, "over", seed=3)
    pairs = list(single)
    assert len({aug for _, aug in pairs}) == len(pairs)
    shards = [list(EpochSampler(LABELS, "over", seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(pairs)


@pytest.mark.parametrize("mode", ["none", "over", "under"])
@pytest.mark.parametrize("replicas", [2, 3])
def test_union_of_shards_is_the_single_process_draw(mode, replicas):
    single = EpochSampler(LABELS, mode, seed=7)
    single.set_epoch(2)
    shards = []
    for rank in range(replicas):
        sampler = EpochSampler(LABELS, mode, seed=7, num_replicas=replicas, rank=rank)
        sampler.set_epoch(2)
        shards.append([index for index, _ in sampler])
        assert len(shards[-1]) == len(sampler)
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    draw = single.draw(2).tolist()
    merged = [shards[r][i] for i in range(len(shards[0])) for r in range(replicas)]
    padding = len(merged) - len(draw)
    assert 0 <= padding < replicas
    assert merged[: len(draw)] == draw  # interleaving the shards gives back the draw, in order


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_sequential_validation_shards_cover_each_sample_once(replicas):
    n = 101  # odd on purpose
    shards = [list(EpochSampler([0] * n, "sequential", num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert sorted(i for s in shards for i in s) == list(range(n))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sampling mode 'sideways'"):
        EpochSampler(LABELS, "sideways")
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(LABELS, num_replicas=2, rank=2)
