"""Several processes, one result: the process state, gathering shares in order, summing counts.

A job that splits its work over the processes of an ``accelerate launch`` takes every
``num_processes``-th item (``process_state()`` says which), and ``gather_in_order`` puts the
results back in dataset order on every process. One process alone needs no setup.
"""

from __future__ import annotations

import torch


def process_state():
    """accelerate's ``PartialState``. ``accelerate launch`` on CPU sets ``ACCELERATE_USE_CPU``, which only
    ``AcceleratorState`` reads by itself, so it is passed on here: ``--multi_gpu`` then runs real
    ranks on CPU (gloo)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def gather_in_order(indices: list[int], tensors: list[torch.Tensor | None], total: int,
                    skipped: list[int] = ()) -> list[torch.Tensor | None]:
    """Every process's ``(indices, tensors)`` -> the full tensors in dataset order, on every process.

    ``indices`` are this process's item positions in ``[0, total)``; ``tensors[j]`` holds one row per
    index (or None when this process has none of that kind); ``skipped`` are its positions that gave
    no row (unreadable images), left out of the result. Raises when the shares do not cover
    ``[0, total)`` exactly.
    """
    from accelerate.utils import gather_object

    parts = [(list(indices), list(skipped), tensors)]
    if process_state().num_processes > 1:
        parts = gather_object(parts)
    order = torch.tensor([i for part_indices, _, _ in parts for i in part_indices], dtype=torch.long)
    covered = order.tolist() + [i for _, part_skipped, _ in parts for i in part_skipped]
    if sorted(covered) != list(range(total)):
        raise RuntimeError(f"gathered {len(covered)} items for a set of {total}: a process lost its share")
    rank = order.argsort()
    results = []
    for position in range(len(tensors)):
        pieces = [part_tensors[position] for _, _, part_tensors in parts if part_tensors[position] is not None]
        results.append(torch.cat(pieces)[rank] if pieces else None)
    return results


def sum_over_processes(counts: torch.Tensor) -> torch.Tensor:
    """Sums ``counts`` in place over the processes of a distributed run (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return counts


__all__ = ["process_state", "gather_in_order", "sum_over_processes"]
