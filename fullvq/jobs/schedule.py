"""What each optimiser step sees: its learning rate and its batch.

* ``lr_multiplier``: the learning-rate schedules, FVQ's annealing among them;
* ``SeededItems`` and ``EpochSampler``: a deterministic, sharded, resumable data order in which
  every item's augmentation is seeded by (run seed, epoch, index).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str = "annealing", *,
                  hold_fraction: float = 0.3, warmup_start_ratio: float = 0.005,
                  final_lr_ratio: float = 0.01) -> float:
    """Learning-rate factor for optimiser step ``step`` (0-based) of ``total_steps``.

    All schedules warm up linearly from ``warmup_start_ratio`` to 1 over ``warmup_steps``. Then
    ``annealing`` (FVQ) holds 1 for ``hold_fraction`` of the remaining steps and decays linearly to
    ``final_lr_ratio`` at the last step; ``cosine`` decays along a half cosine to
    ``final_lr_ratio``; ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return warmup_start_ratio + (1 - warmup_start_ratio) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    if schedule == "cosine":
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "annealing":
        if progress <= hold_fraction:
            return 1.0
        decay = (progress - hold_fraction) / max(1e-12, 1 - hold_fraction)
        return 1.0 - (1 - final_lr_ratio) * decay
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose annealing, cosine or constant")


class SeededItems(Dataset):
    """Runs each item's random augmentation under a seed of (run seed, epoch, index).

    The data a step sees then depends only on the step, never on worker count, process timing or
    where a run was resumed: a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + int(index)) % (2**63))
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This process's share of a seeded permutation per epoch, after skipping ``skip`` of its items."""

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int, skip: int = 0):
        self.size, self.rank, self.world, self.seed, self.epoch, self.skip = size, rank, world, seed, epoch, skip
        self.per_rank = size // world

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.per_rank * self.world]
        return iter(order[self.rank :: self.world][self.skip :].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


__all__ = ["lr_multiplier", "SeededItems", "EpochSampler"]
