"""Several processes, one result: the process state, gathering shares in order, summing counts.

A job that splits its work over the processes of an ``accelerate launch`` takes every
``num_processes``-th item (``process_state()`` says which), and ``gather_in_order`` puts the
results back in dataset order on every process. One process alone needs no setup.
"""

from __future__ import annotations

import torch

# Collective timeout of the long jobs (cache-tokens, gFID): a rank that finished its share waits in a
# barrier for the others, longer than NCCL's default 10 minutes when shards take long.
LONG_JOB_TIMEOUT_HOURS = 6


def cpu_ranks() -> bool:
    """Whether this process is one of several CPU ranks: ``ACCELERATE_USE_CPU`` is set, or it was launched
    as one of several processes (``WORLD_SIZE`` > 1) on a machine without CUDA, where accelerate would
    otherwise start every process as a lone run of its own, all writing the same output."""
    import os

    from accelerate.utils import parse_flag_from_env

    launched_several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (launched_several and not torch.cuda.is_available())


def process_state():
    """accelerate's ``PartialState``. Several processes on CPU (see :func:`cpu_ranks`) are passed on as
    ``cpu=True``, which only ``AcceleratorState`` reads by itself from ``ACCELERATE_USE_CPU``: ``--multi_gpu``
    then runs real ranks on CPU (gloo). The process group it starts waits ``LONG_JOB_TIMEOUT_HOURS`` in a
    collective."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=cpu_ranks(), timeout=timedelta(hours=LONG_JOB_TIMEOUT_HOURS))


def loader_options(num_workers: int | None, device: torch.device | str) -> dict:
    """DataLoader settings for images read onto ``device``: ``num_workers`` decoding processes (``None``:
    8 for a GPU, which would otherwise wait on the decoding, 0 on the CPU, where the main process
    decodes) and, for a GPU, page-locked batches so the copies run asynchronously."""
    on_gpu = torch.device(device).type == "cuda"
    workers = (8 if on_gpu else 0) if num_workers is None else num_workers
    return {"num_workers": workers, "pin_memory": on_gpu}


def my_share(items: list, process_index: int, num_processes: int) -> list:
    """This process's share of ``items`` (every ``num_processes``-th, from ``process_index``). Filter what
    is finished before splitting, so a resumed job stays balanced: a rank with nothing left would
    otherwise wait for the others in a barrier."""
    return items[process_index::num_processes]


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


__all__ = ["LONG_JOB_TIMEOUT_HOURS", "cpu_ranks", "loader_options", "my_share", "process_state", "gather_in_order",
           "sum_over_processes"]
