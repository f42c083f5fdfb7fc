"""What a training run sets up for its devices and process layout: the GPU speed switches, torch.compile,
and the rules of sharded (FSDP) training. ``Trainer`` calls these; each switch is a ``train.*`` key.

- ``allow_tf32`` (CUDA): TF32 matmuls and convolutions for the autoencoder, GPT and DiT; the exact
  nearest-code search and Inception pin IEEE float32 themselves (``fullvq.precision``).
- cuDNN autotuning (CUDA, always: training shapes are fixed) and ``channels_last`` for conv models.
- ``fused_adam`` (default: on CUDA without FSDP): one fused AdamW kernel over all parameters.
- ``compile``: ``compile_blocks()`` where a model has it (the tokenizer's encoder / decoder, each GPT
  block), else ``torch.compile`` of the whole model (the discriminator, the DiT).
- FSDP: accelerate's FSDP2 with one model per stage (the GPT's or the DiT's). Sharded weights cannot
  be read on one process alone, so samples and the final export go through ``full_copy``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..precision import allow_tf32


def configure_backends(config, device: torch.device) -> None:
    """TF32 and cuDNN autotuning on CUDA as ``config`` (a ``TrainConfig``) says; nothing elsewhere."""
    if device.type != "cuda":
        return
    allow_tf32(config.allow_tf32)
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its convolution algorithms once


def on_gpu_unless_set(value: bool | None, device: torch.device) -> bool:
    """A switch left at ``None`` means: on for CUDA, off elsewhere."""
    return device.type == "cuda" if value is None else value


def prepare_models(models: dict[str, nn.Module], config, device: torch.device) -> None:
    """``channels_last`` and ``compile`` for the stage's models, in place, before accelerate wraps them."""
    for model in models.values():
        if on_gpu_unless_set(config.channels_last, device):
            model.to(memory_format=torch.channels_last)  # 4D weights only; a GPT is unchanged
        if config.compile:
            if hasattr(model, "compile_blocks"):
                model.compile_blocks()
            else:
                model.compile()


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(accelerator, models: dict[str, nn.Module]) -> None:
    """Refuse, before any work, what FSDP cannot do here."""
    if not is_sharded(accelerator):
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ConfigError(f"FSDP version {version}: fullvq trains with FSDP2 only (optimisers built before wrapping "
                          "are remapped by it); set fsdp_version: 2, as configs/accelerate/fsdp.yaml does")
    if len(models) > 1:
        raise ConfigError(f"this stage trains {sorted(models)} and FSDP shards one model per run; train the tokenizer "
                          "with DDP (configs/accelerate/ddp.yaml): it is small, and FSDP is for the large GPTs")
    for module in models["model"].modules():
        if getattr(module, "revive_after", 0) > 0 and getattr(module, "group_size", 1) > 1:
            raise ConfigError("FVQ slot revival rewrites part of a weight in place, which FSDP's shards would lose; "
                              "train the tokenizer with DDP (configs/accelerate/ddp.yaml)")


def full_copy(accelerator, model: nn.Module, cache: dict) -> nn.Module | None:
    """An unsharded copy of the FSDP-wrapped ``model`` on the main process (``None`` on the others), on the
    CPU, holding the current weights. Every process must call it (it gathers). ``cache`` keeps the
    copy between calls, so it is built once."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    if "copy" not in cache:
        plain = accelerator.unwrap_model(model)
        config = plain.config
        cache["copy"] = type(plain)(config) if hasattr(type(plain), "config_class") else type(plain).from_config(config)
    copy = cache["copy"]
    copy.load_state_dict(state)
    return copy


def parameter_checksum(accelerator, model: nn.Module) -> torch.Tensor:
    """The sum of every parameter (float64), the same on every process when they agree; under FSDP
    the shards' sums are added over processes."""
    local = [p.to_local() if type(p).__name__ == "DTensor" else p for p in model.parameters()]
    total = torch.stack([p.detach().double().sum() for p in local]).sum().reshape(1).to(accelerator.device)
    if is_sharded(accelerator):
        total = accelerator.reduce(total, "sum")
    return total


__all__ = ["check_sharding", "configure_backends", "full_copy", "is_sharded", "on_gpu_unless_set",
           "parameter_checksum", "prepare_models"]
