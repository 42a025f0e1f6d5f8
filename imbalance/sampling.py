"""Epoch samplers: shuffling, random over- and undersampling, and exact sharding under DDP.

Every rank computes the same full draw from (seed, epoch) and takes the slice `draw[rank::num_replicas]`,
so the union of the shards is the single-process draw. Nothing is copied on disk: oversampling repeats
indices. When the draw length is not a multiple of the number of ranks, the short shards repeat their
first index once so every rank runs the same number of steps (what DDP needs); validation ("sequential")
is never padded, so each validation sample is seen exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MODES = ("none", "over", "under", "sequential")


def resample_indices(labels: Sequence[int], mode: str, rng: np.random.Generator) -> np.ndarray:
    """Indices after random over/undersampling (unshuffled: originals first, like imbalanced-learn).

    over: every sample once, plus minority samples drawn with replacement up to the majority count;
    under: every minority sample, plus majority samples drawn without replacement down to the minority count.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if mode in ("none", "sequential") or len(classes) < 2:
        return np.arange(len(labels))
    target = counts.max() if mode == "over" else counts.min()
    parts = []
    for cls, count in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == cls)
        if mode == "over":
            extra = rng.choice(members, size=target - count, replace=True) if target > count else members[:0]
            parts.append(np.concatenate([members, extra]))
        else:
            parts.append(rng.choice(members, size=target, replace=False) if count > target else members)
    return np.concatenate(parts)


class EpochSampler(Sampler[int]):
    """Draws indices for one epoch from (seed, epoch) and yields this rank's shard of them."""

    def __init__(
        self, labels: Sequence[int], mode: str = "none", seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sampling mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.labels = np.asarray(labels)
        self.mode = mode
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch, so every epoch gets a fresh draw."""
        self.epoch = epoch

    def draw(self, epoch: int | None = None) -> np.ndarray:
        """The full single-process draw for an epoch: the same on every rank."""
        if self.mode == "sequential":
            return np.arange(len(self.labels))
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        indices = resample_indices(self.labels, self.mode, rng)
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
        """Length of every epoch's draw: it depends on the class counts only, not on the random draw."""
        _, counts = np.unique(self.labels, return_counts=True)
        if self.mode in ("over", "under") and len(counts) > 1:
            return int((counts.max() if self.mode == "over" else counts.min()) * len(counts))
        return len(self.labels)

    def __len__(self) -> int:
        return self._shard_length(self.draw_length())
