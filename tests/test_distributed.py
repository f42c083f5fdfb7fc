"""Process state: several launched processes are ranks of one run, on GPUs or on the CPU."""

import torch

from fullvq.distributed import cpu_ranks


def test_several_processes_launched_on_a_machine_without_cuda_run_as_cpu_ranks(monkeypatch):
    # `accelerate launch --multi_gpu --num_processes 2` on a CPU machine, without ACCELERATE_USE_CPU:
    # each process used to train alone, and the second was refused the first one's folder lock.
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_ranks()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not cpu_ranks()  # one process needs no process group
    monkeypatch.delenv("WORLD_SIZE")
    assert not cpu_ranks()


def test_gpus_are_used_when_there_are_some_unless_cpu_is_asked_for(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not cpu_ranks()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    assert cpu_ranks()
