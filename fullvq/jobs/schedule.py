"""What each optimiser step sees: its learning rate and its batch.

* ``lr_multiplier``: the learning-rate schedules, FVQ's annealing among them;
* ``SeededItems`` and ``EpochSampler``: a deterministic, sharded, resumable data order in which
  every item's augmentation is seeded by (run seed, epoch, index);
* ``RunBatches``: one DataLoader for the run that follows that order from any step on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


def run_length(config, dataset_size: int | None, world: int) -> tuple[int | None, int, int]:
    """``(steps_per_epoch, total_steps, warmup_steps)`` of a run (``config``: a ``TrainConfig``) over a
    set of ``dataset_size`` items (``None``: a stream) on ``world`` processes; a clear error for a
    set too small for one step, or a stream without ``max_steps``."""
    from ..config import ConfigError

    if dataset_size is None:
        if config.max_steps is None:
            raise ConfigError("a streaming dataset has no length: set train.max_steps instead of train.epochs")
        steps_per_epoch = None
    else:
        steps_per_epoch = dataset_size // world // config.batch_size // config.gradient_accumulation_steps
        if steps_per_epoch < 1:
            raise ConfigError(
                f"{dataset_size} images make no full step of batch_size={config.batch_size} x "
                f"{world} processes x {config.gradient_accumulation_steps} accumulation; lower train.batch_size"
            )
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    if config.warmup_steps is not None:
        warmup_steps = config.warmup_steps
    else:
        warmup_steps = round(config.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
    return steps_per_epoch, total_steps, min(warmup_steps, max(0, total_steps - 1))


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

    def __getitem__(self, key: int | tuple[int, int]):
        # (epoch, index) from EpochSampler(tag_epoch=True): persistent workers hold their own copy of
        # this object, so the epoch travels with each index rather than through self.epoch.
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + int(index)) % (2**63))
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This process's share of a seeded permutation per epoch, after skipping ``skip`` of its items.

    ``epoch`` and ``skip`` may be changed between passes (one DataLoader serves every epoch);
    ``tag_epoch`` yields ``(epoch, index)`` pairs for ``SeededItems``.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int, skip: int = 0,
                 tag_epoch: bool = False):
        self.size, self.rank, self.world, self.seed, self.epoch, self.skip = size, rank, world, seed, epoch, skip
        self.per_rank = size // world
        self.tag_epoch = tag_epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.per_rank * self.world]
        indices = order[self.rank :: self.world][self.skip :].tolist()
        return iter([(self.epoch, i) for i in indices] if self.tag_epoch else indices)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


# Batch entries read on the host (counts for the logs): moving them would make reading them a sync.
HOST_KEYS = ("skipped",)


def to_device(batch, device: torch.device):
    """Tensors of ``batch`` (nested dicts) on ``device``, asynchronously from pinned memory; ``HOST_KEYS`` stay."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: v if k in HOST_KEYS else to_device(v, device) for k, v in batch.items()}
    return batch


class RunBatches:
    """A training run's micro-batches from any optimiser step on, epoch after epoch.

    One DataLoader serves the whole run, so its workers persist across epochs (``persistent_workers``),
    with batches pinned for asynchronous copies (``pin_memory``; default on CUDA); a sized set is
    read in this process's share of a seeded permutation per epoch (``EpochSampler``), a stream as
    the dataset shards it.
    """

    def __init__(self, dataset, config, accelerator, steps_per_epoch: int | None):
        from .devices import on_gpu_unless_set

        self.config, self.device, self.steps_per_epoch = config, accelerator.device, steps_per_epoch
        # Its own generator: a DataLoader draws a base seed from the global RNG at every pass, which would
        # shift a resumed run's dropout and noise away from the uninterrupted run's.
        rank, world = accelerator.process_index, accelerator.num_processes
        options = dict(batch_size=config.batch_size, num_workers=config.num_workers, drop_last=True,
                       pin_memory=on_gpu_unless_set(config.pin_memory, accelerator.device),
                       generator=torch.Generator().manual_seed(config.seed * 1_000 + rank))
        if config.num_workers > 0:
            options.update(persistent_workers=config.persistent_workers, prefetch_factor=4)
        self.sampler = None
        if steps_per_epoch is None:  # a stream, split between processes by the dataset (split_dataset_by_node)
            self.loader = DataLoader(dataset.shard(rank, world) if world > 1 else dataset, **options)
        else:
            self.sampler = EpochSampler(len(dataset), rank, world, config.seed, 0, tag_epoch=True)
            self.loader = DataLoader(SeededItems(dataset, config.seed), sampler=self.sampler, **options)

    def from_step(self, step: int) -> Iterator[dict]:
        accumulation = self.config.gradient_accumulation_steps
        if self.sampler is None:
            skip = step * accumulation
            while True:
                for batch in self.loader:
                    if skip:
                        skip -= 1
                        continue
                    yield to_device(batch, self.device)
        micro_per_epoch = self.steps_per_epoch * accumulation
        epoch, done = divmod(step * accumulation, micro_per_epoch)
        while True:
            self.sampler.epoch, self.sampler.skip = epoch, done * self.config.batch_size
            for i, batch in enumerate(self.loader):
                if done + i >= micro_per_epoch:
                    break
                yield to_device(batch, self.device)
            epoch, done = epoch + 1, 0


__all__ = ["lr_multiplier", "run_length", "SeededItems", "EpochSampler", "RunBatches", "HOST_KEYS", "to_device"]
