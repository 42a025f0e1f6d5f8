"""Epoch samplers: shuffling, random over- and undersampling, softer class-aware resampling (square-root and
progressively-balanced), and exact sharding under DDP.

Every rank computes the same full draw from (seed, epoch) and takes the slice `draw[rank::num_replicas]`,
so the union of the shards is the single-process draw. Nothing is copied on disk: oversampling repeats
indices. When the draw length is not a multiple of the number of ranks, the short shards repeat their
first index once so every rank runs the same number of steps (what DDP needs); validation ("sequential")
is never padded, so each validation sample is seen exactly once.

The soft modes ("sqrt", "progressive") are class-aware sampling with class probabilities p_c between the
instance-balanced p_c^IB = n_c / N (each sample as often as any other) and the class-balanced
p_c^CB = 1 / K (each class as often as any other), N = sum of the n_c over the K classes present:

- "sqrt": p_c = n_c^q / sum_k n_k^q, q = 1/2 by default (square-root sampling, Mahajan et al., "Exploring
  the Limits of Weakly Supervised Pretraining", ECCV 2018; the general q as in Kang et al., "Decoupling
  Representation and Classifier for Long-Tailed Recognition", ICLR 2020). q = 1 is instance-balanced,
  q = 0 class-balanced.
- "progressive": p_c(t) = (1 - t/T) p_c^IB + (t/T) p_c^CB (progressively-balanced sampling, Kang et al.,
  ICLR 2020), t the epoch (0-based) and T = epochs - 1 here, so the first epoch is instance-balanced and the
  last one fully class-balanced; a run of a single epoch is class-balanced (its only epoch is its last), and
  epochs past T stay class-balanced. The schedule uses the run's --epochs: a resume that grows --epochs
  stretches it for the remaining epochs (as it stretches the cosine learning-rate schedule).

Their epochs keep the training set size: class c gets round(N p_c) indices (largest-remainder rounding, so
the counts sum to exactly N and the epoch length is the same for every epoch and every rank). The class
counts of an epoch are therefore fixed, not random; only which samples fill them is drawn. With the same
conventions as over/undersampling: a class that gets more than its n_c keeps every one of its samples once
plus the surplus drawn with replacement (as "over"), a class that gets fewer draws that many distinct samples
without replacement (as "under"). So within a class every sample is equally likely, q = 1 reproduces the data
set exactly (a plain shuffle), and no sample of an oversampled class is left out of an epoch by chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MODES = ("none", "over", "under", "sqrt", "progressive", "sequential")
DEFAULT_Q = 0.5  # the exponent of square-root sampling


def soft_class_probabilities(
    counts: Sequence[int], mode: str, q: float = DEFAULT_Q, progress: float = 1.0
) -> np.ndarray:
    """Class probabilities p_c of the soft modes, for class counts n_c (all positive).

    sqrt: p_c = n_c^q / sum_k n_k^q. progressive: p_c = (1 - progress) n_c / N + progress / K, with progress
    t/T of the schedule (see the module docstring).
    """
    counts = np.asarray(counts, dtype=float)
    if mode == "sqrt":
        weights = counts**q
        return weights / weights.sum()
    if mode == "progressive":
        return (1 - progress) * counts / counts.sum() + progress / len(counts)
    raise ValueError(f"{mode!r} is not a soft sampling mode (sqrt, progressive)")


def apportion(total: int, probabilities: Sequence[float]) -> np.ndarray:
    """Integer counts summing to `total`, each round(total p_c) up to one: the floors of total p_c, plus one for
    the classes with the largest remainders (ties to the lower label), so the counts always sum to `total`."""
    exact = total * np.asarray(probabilities, dtype=float)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def resample_indices(
    labels: Sequence[int], mode: str, rng: np.random.Generator, q: float = DEFAULT_Q, progress: float = 1.0
) -> np.ndarray:
    """Indices after resampling (unshuffled, class by class; originals first, like imbalanced-learn).

    over: every sample once, plus minority samples drawn with replacement up to the majority count;
    under: every minority sample, plus majority samples drawn without replacement down to the minority count;
    sqrt, progressive: round(N p_c) indices of class c (see the module docstring): every sample once plus the
    surplus with replacement where that is more than n_c, distinct samples without replacement where fewer.
    `q` is the exponent of sqrt, `progress` the t/T of progressive.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if mode in ("none", "sequential") or len(classes) < 2:
        return np.arange(len(labels))
    if mode in ("sqrt", "progressive"):
        targets = apportion(len(labels), soft_class_probabilities(counts, mode, q, progress))
    else:
        targets = np.full(len(classes), counts.max() if mode == "over" else counts.min())
    parts = []
    for cls, count, target in zip(classes, counts, targets, strict=True):
        members = np.flatnonzero(labels == cls)
        if mode == "over" or (mode != "under" and target > count):
            extra = rng.choice(members, size=target - count, replace=True) if target > count else members[:0]
            parts.append(np.concatenate([members, extra]))
        elif mode == "under":
            parts.append(rng.choice(members, size=target, replace=False) if count > target else members)
        else:
            parts.append(rng.choice(members, size=target, replace=False))
    return np.concatenate(parts)


class EpochSampler(Sampler[int]):
    """Draws indices for one epoch from (seed, epoch) and yields this rank's shard of them.

    `q` is the exponent of mode "sqrt" (None: 1/2), `epochs` the run's number of epochs, which mode
    "progressive" needs for its schedule; other modes ignore both.
    """

    def __init__(
        self,
        labels: Sequence[int],
        mode: str = "none",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        q: float | None = None,
        epochs: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sampling mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        q = DEFAULT_Q if q is None else q
        if not 0 <= q <= 1:
            raise ValueError(f"sampling exponent q must be in [0, 1], got {q}")
        if mode == "progressive" and (epochs is None or epochs < 1):
            raise ValueError(f"progressive sampling needs the run's number of epochs (at least 1), got {epochs}")
        self.labels = np.asarray(labels)
        self.mode = mode
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.q = q
        self.epochs = epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch, so every epoch gets a fresh draw."""
        self.epoch = epoch

    def progress(self, epoch: int | None = None) -> float:
        """t/T of progressive sampling: 0 at the first epoch, 1 at the last (T = epochs - 1) and after it;
        1 for a run of one epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self.epochs is None or self.epochs <= 1:
            return 1.0
        return min(1.0, max(0.0, epoch / (self.epochs - 1)))

    def draw(self, epoch: int | None = None) -> np.ndarray:
        """The full single-process draw for an epoch: the same on every rank."""
        if self.mode == "sequential":
            return np.arange(len(self.labels))
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        indices = resample_indices(self.labels, self.mode, rng, q=self.q, progress=self.progress(epoch))
        return indices[rng.permutation(len(indices))]

    def _shard_length(self, total: int) -> int:
        if self.mode == "sequential":
            return len(range(self.rank, total, self.num_replicas))
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        draw = self.draw()
        positions = np.arange(len(draw))[self.rank :: self.num_replicas]
        length = self._shard_length(len(draw))
        if len(positions) < length:  # pad a short training shard so all ranks take the same number of steps
            positions = np.concatenate([positions, positions[: length - len(positions)]])
        if self.mode == "sequential":
            return iter(draw[positions].tolist())
        # Training items carry their own augmentation seed, a function of (seed, epoch, position in the
        # draw): augmentation then does not depend on worker count, rank or process restarts, so a resumed
        # run sees exactly the images an uninterrupted one would. Oversampled copies get different seeds.
        aug_seeds = ((self.seed * 1_000_003 + self.epoch) * 100_000_007 + positions) % (2**63 - 1)
        return iter(zip(draw[positions].tolist(), aug_seeds.tolist(), strict=True))

    def draw_length(self) -> int:
        """Length of every epoch's draw: it depends on the class counts only, not on the random draw (the soft
        modes keep the training set size N)."""
        _, counts = np.unique(self.labels, return_counts=True)
        if self.mode in ("over", "under") and len(counts) > 1:
            return int((counts.max() if self.mode == "over" else counts.min()) * len(counts))
        return len(self.labels)

    def __len__(self) -> int:
        return self._shard_length(self.draw_length())
