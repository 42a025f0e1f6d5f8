"""Resampling: class counts as imbalanced-learn's samplers give them, the soft modes' class frequencies as their
formulas give them, determinism, exact DDP shards, and the --sampling/--sampling-q command line."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler

from experiments import run as run_cli
from imbalance.config import RunConfig
from imbalance.sampling import EpochSampler, apportion

LABELS = [0] * 110 + [1] * 10  # imbalanced-1 in miniature
ODD = [1] * 10 + [0] * 201  # 211 samples, a prime: every shard count pads
EPOCHS = 10  # the run length given to progressive samplers here


def sampler(labels, mode, **kwargs) -> EpochSampler:
    """An `EpochSampler`; progressive ones get a run of EPOCHS epochs unless told otherwise."""
    if mode == "progressive":
        kwargs.setdefault("epochs", EPOCHS)
    return EpochSampler(labels, mode, **kwargs)


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


@pytest.mark.parametrize("mode", ["none", "over", "under", "sqrt", "progressive"])
def test_draw_depends_on_seed_and_epoch_only(mode):
    a, b = sampler(LABELS, mode, seed=1), sampler(LABELS, mode, seed=1)
    assert np.array_equal(a.draw(3), b.draw(3))
    assert not np.array_equal(a.draw(3), a.draw(4))
    assert not np.array_equal(a.draw(3), sampler(LABELS, mode, seed=2).draw(3))
    for epoch in range(5):  # an epoch's draw does not depend on the epochs drawn before it, nor on the rank
        a.set_epoch(epoch)
        list(a)
    assert np.array_equal(a.draw(3), sampler(LABELS, mode, seed=1, num_replicas=3, rank=2).draw(3))
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


@pytest.mark.parametrize("mode", ["none", "over", "under", "sqrt", "progressive"])
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("labels", [LABELS, ODD], ids=["110-10", "201-10"])
def test_union_of_shards_is_the_single_process_draw(mode, replicas, labels):
    single = sampler(labels, mode, seed=7)
    single.set_epoch(2)
    shards = []
    for rank in range(replicas):
        shard = sampler(labels, mode, seed=7, num_replicas=replicas, rank=rank)
        shard.set_epoch(2)
        shards.append([index for index, _ in shard])
        assert len(shards[-1]) == len(shard)
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
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
            EpochSampler(LABELS, "sqrt", q=q)
    for epochs in (None, 0):
        with pytest.raises(ValueError, match="progressive sampling needs the run's number of epochs"):
            EpochSampler(LABELS, "progressive", epochs=epochs)


# ----------------------------------------------------------------- square-root and progressive sampling

SKEWED = [1] * 10 + [0] * 200  # 10:200, N = 210
N_DRAWS = 200


def ib_cb(p_ib: float, t: float) -> float:
    """Kang et al.'s progressively-balanced p(t) of a class with instance-balanced p_ib, two classes."""
    return (1 - t) * p_ib + t * 0.5


SOFT_CASES = [
    # (mode, sampler options, epoch, the formula's probability of the 10-sample class)
    ("sqrt", {}, 0, 10**0.5 / (10**0.5 + 200**0.5)),
    ("sqrt", {"q": 0.25}, 0, 10**0.25 / (10**0.25 + 200**0.25)),
    ("sqrt", {"q": 0.8}, 0, 10**0.8 / (10**0.8 + 200**0.8)),
    ("progressive", {"epochs": 5}, 0, ib_cb(10 / 210, 0)),  # first epoch: instance-balanced
    ("progressive", {"epochs": 5}, 2, ib_cb(10 / 210, 2 / 4)),  # middle: t/T with T = epochs - 1 = 4
    ("progressive", {"epochs": 5}, 4, ib_cb(10 / 210, 1)),  # last epoch: class-balanced
]


@pytest.mark.parametrize(("mode", "options", "epoch", "p_minority"), SOFT_CASES)
def test_soft_class_frequencies_match_their_formulas(mode, options, epoch, p_minority):
    labels = np.array(SKEWED)
    n, members = len(labels), [np.flatnonzero(labels == c) for c in (0, 1)]
    if mode == "progressive":  # one epoch of the schedule, drawn under many seeds
        draws = [EpochSampler(labels, mode, seed=k, **options).draw(epoch) for k in range(N_DRAWS)]
    else:  # the same probabilities every epoch: many epochs of one seed
        s = EpochSampler(labels, mode, seed=11, **options)
        draws = [s.draw(e) for e in range(N_DRAWS)]
    p = np.array([1 - p_minority, p_minority])
    for draw in draws:  # every draw keeps the set's size and gives class c round(N p_c), to within one
        assert len(draw) == n
        assert np.all(np.abs(np.bincount(labels[draw], minlength=2) - n * p) < 1)
    pooled = np.bincount(labels[np.concatenate(draws)], minlength=2) / (n * N_DRAWS)
    standard_error = np.sqrt(p * (1 - p) / (n * N_DRAWS))
    assert np.all(np.abs(pooled - p) <= 4 * standard_error), (pooled, p)
    # within a class every sample is equally likely: its appearances over the draws stay within 5 binomial
    # standard errors of the class mean (without replacement where the class shrinks, every sample once plus
    # draws with replacement where it grows)
    appearances = np.bincount(np.concatenate(draws), minlength=n)
    for c, target in enumerate(apportion(n, p)):
        size = len(members[c])
        if target <= size:
            rate, variance = target / size, target / size * (1 - target / size)
        else:
            rate, variance = target / size, (target - size) / size * (1 - 1 / size)
        spread = 5 * np.sqrt(N_DRAWS * variance) + 1e-9
        assert np.all(np.abs(appearances[members[c]] - N_DRAWS * rate) <= spread), (c, appearances[members[c]])


def test_the_ends_of_the_soft_modes():
    labels = np.array(SKEWED)
    assert sorted(EpochSampler(labels, "sqrt", q=1.0).draw(0).tolist()) == list(range(210))  # q = 1: a shuffle
    balanced = EpochSampler(labels, "sqrt", q=0.0).draw(0)  # q = 0: class-balanced at the set's size
    assert np.bincount(labels[balanced]).tolist() == [105, 105]
    assert set(range(10)) <= set(balanced.tolist())  # the grown class keeps every sample (as "over")
    assert len(set(balanced[labels[balanced] == 0].tolist())) == 105  # the shrunk one has no repeats ("under")
    for epochs, epoch in [(1, 0), (5, 4), (5, 9)]:  # one epoch, the last, and past the last: class-balanced
        draw = EpochSampler(labels, "progressive", epochs=epochs).draw(epoch)
        assert np.bincount(labels[draw]).tolist() == [105, 105]
    assert sorted(EpochSampler(labels, "progressive", epochs=5).draw(0).tolist()) == list(range(210))
    three = np.repeat([0, 1, 2], [110, 100, 7])  # three classes, N = 217: the counts still sum to N
    for q in (0.0, 0.3, 0.5, 1.0):
        draw = EpochSampler(three, "sqrt", q=q).draw(0)
        expected = np.array([110, 100, 7]) ** q / (np.array([110, 100, 7]) ** q).sum() * 217
        assert len(draw) == 217 and np.all(np.abs(np.bincount(three[draw]) - expected) < 1)


@pytest.mark.parametrize("mode", ["sqrt", "progressive"])
def test_soft_sampler_length_is_the_same_on_every_rank_and_epoch(mode):
    for replicas in (1, 2, 3, 4):
        lengths = set()
        for rank in range(replicas):
            s = sampler(ODD, mode, seed=5, num_replicas=replicas, rank=rank)
            for epoch in (0, EPOCHS // 2, EPOCHS - 1):
                s.set_epoch(epoch)
                lengths |= {len(s), len(list(s))}
        assert lengths == {-(-len(ODD) // replicas)}


SMOKE = ["--fast-dev-run", "--backbone", "test_resnet", "--image-size", "16", "--logger", "none"]


@pytest.mark.parametrize("mode", ["sqrt", "progressive"])
def test_soft_sampling_runs_from_the_cli(mode, tmp_path):
    assert run_cli.main(["--sampling", mode, *SMOKE]) == 0
    assert not list(tmp_path.glob("runs/**/*.*")), "a --fast-dev-run smoke test writes nothing"


def test_sampling_q_and_epochs_reach_the_training_sampler():
    from imbalance.train import prepare

    cfg = RunConfig(backbone="test_resnet", image_size=16, sampling="sqrt", sampling_q=0.25, epochs=3).validate()
    train_sampler = prepare(cfg)[2].train_dataloader().sampler
    assert (train_sampler.mode, train_sampler.q, train_sampler.epochs) == ("sqrt", 0.25, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampling-q", "0.3"], "--sampling-q is the exponent of --sampling sqrt, but --sampling is 'none'"),
        (["--sampling", "progressive", "--sampling-q", "0.5"], "but --sampling is 'progressive'"),
        (["--sampling", "over", "--sampling-q", "0.5"], "but --sampling is 'over'"),
        (["--sampling", "sqrt", "--sampling-q", "1.5"], "--sampling-q must be in [0, 1]"),
        (["--sampling", "sqrt", "--sampling-q", "-0.1"], "--sampling-q must be in [0, 1]"),
        (["--sampling", "sqrt", "--sampling-q", "nan"], "--sampling-q must be a finite number"),
    ],
)
def test_sampling_q_errors_name_the_flag(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main([*args, "--epochs", "1", "--logger", "none", "--out", "runs/x"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sampling_q_bounds_are_accepted():
    for q in (0.0, 0.5, 1.0):
        assert RunConfig(sampling="sqrt", sampling_q=q).validate().sampling_q == q
