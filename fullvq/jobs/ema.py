"""An exponential moving average of the model's weights, updated in place, sharded under FSDP.

The decay schedule is diffusers' ``EMAModel``'s (``min(decay, (1 + t) / (10 + t))`` at update ``t``,
0 at the first), and so is the saved file (``ema.safetensors``, one tensor per parameter name) and
``optimization_step``: checkpoints written by either resume with the other. The update is one fused
``lerp`` over all parameters, with no temporary copy of the model (diffusers' ``foreach`` path
allocates one: 2.7 GB a step for DiT-XL). Under FSDP each process averages its own shards (the
parameters are DTensors), and ``full_state`` gathers them when a file is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


class ExponentialMovingAverage:
    """EMA of ``parameters`` (the model's, in ``named_parameters`` order) with decay ``decay``."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay={decay} must lie in (0, 1), e.g. 0.9999")
        self.decay = decay
        self.optimization_step = 0
        self.shadow = [p.detach().clone() for p in parameters]

    def current_decay(self) -> float:
        """The decay of the update just counted in ``optimization_step`` (diffusers' schedule)."""
        step = self.optimization_step - 1
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, parameters: Sequence[nn.Parameter]) -> None:
        """Move the average towards ``parameters``; frozen ones are copied."""
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        trained = [(s, p.detach()) for s, p in zip(self.shadow, parameters, strict=True) if p.requires_grad]
        frozen = [(s, p.detach()) for s, p in zip(self.shadow, parameters, strict=True) if not p.requires_grad]
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], weight)
        for s, p in frozen:
            s.copy_(p)

    @contextlib.contextmanager
    def applied_to(self, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
        """Within the block, ``parameters`` hold the average; their own values come back after."""
        targets = [p.detach() for p in parameters]
        with torch.no_grad():
            saved = [t.clone() for t in targets]
            torch._foreach_copy_(targets, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, saved)

    @torch.no_grad()
    def full_state(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: full average}`` on the CPU. Under FSDP every process must call it (it gathers)."""
        return {name: (t.full_tensor() if _is_sharded(t) else t).detach().cpu().contiguous()
                for name, t in zip(names, self.shadow, strict=True)}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], names: Sequence[str]) -> None:
        """Set the average from ``full_state``'s output (on every process; each keeps its shards)."""
        missing = [name for name in names if name not in state]
        if missing:
            raise KeyError(f"the EMA file lacks {missing[:5]}: it belongs to another model")
        for name, target in zip(names, self.shadow, strict=True):
            full = state[name].to(target.device, target.dtype)
            if _is_sharded(target):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, target.device_mesh, target.placements)
            target.copy_(full)


__all__ = ["ExponentialMovingAverage"]
