"""The second stage's other head: a class-conditional DiT on the tokenizer's quantized latents.

VQGAN-LC shows that a large-codebook tokenizer also serves diffusion (DiT) and flow (SiT)
generators, which work on the quantized latent grid (the codes, (D, h, w)) instead of on token ids.
The network is diffusers' ``DiTTransformer2DModel`` (adaLN-zero, class embedding with a null class
for classifier-free guidance); two objectives train it:

- ``"ddpm"`` (DiT): epsilon prediction under ``DDPMScheduler``'s linear betas (1e-4 .. 0.02, 1000
  steps); sampled with DDIM (or any scheduler built from the same config, e.g. DPM-Solver).
- ``"flow"`` (SiT, rectified flow): ``x_t = (1 - t) x_0 + t noise``, the model predicts the
  velocity ``noise - x_0`` at timestep ``1000 t``; sampled with ``FlowMatchEulerDiscreteScheduler``.

Latents are normalised per channel (mean / std over the training codes) before the network sees
them; the pipeline stores both and undoes it before decoding.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import LabelEmbedding
from diffusers.utils.torch_utils import randn_tensor

from .sampling import classifier_free_guidance

OBJECTIVES = ("ddpm", "flow")
NUM_TRAIN_TIMESTEPS = 1000
CLASS_DROPOUT = 0.1  # DiT's label dropout for classifier-free guidance
# The one default guidance scale of DiT / flow sampling (LatentFlowPipeline, `fullvq sample`, gFID, previews).
DEFAULT_DIT_GUIDANCE_SCALE = 4.0

# DiT-S/B/L/XL: layers, heads, head width (hidden 384 / 768 / 1024 / 1152).
DIT_SIZES: dict[str, dict[str, int]] = {
    "S": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64},
    "B": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
    "L": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64},
    "XL": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72},
}


def build_transformer(*, latent_channels: int, grid_size: int, num_classes: int, size: str | None = None,
                      patch_size: int = 2, **settings) -> DiTTransformer2DModel:
    """A ``DiTTransformer2DModel`` for (latent_channels, grid_size, grid_size) latents. Mind the names:
    diffusers' DiT calls the latent side ``sample_size``, so its ``config.sample_size`` is ``grid_size``
    (tokens), not the image side in pixels that ``sample_size`` means for the tokenizer and pipelines.

    ``size`` (``S``, ``B``, ``L``, ``XL``) sets depth and width as DiT's configs; ``settings``
    (``num_layers``, ``num_attention_heads``, ``attention_head_dim``, ``dropout``, ...) override it.
    Raises ``ValueError`` when ``patch_size`` does not divide the grid.
    """
    if size is not None and size not in DIT_SIZES:
        raise ValueError(f"size={size!r} is not one of {list(DIT_SIZES)}")
    if patch_size < 1 or grid_size % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the latent grid side {grid_size}; choose a "
                         f"divisor of {grid_size} (DiT uses 2; 1 for small grids)")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    config = {**DIT_SIZES.get(size or "S"), **settings}
    config.setdefault("norm_num_groups", 32)
    # diffusers' `sample_size` here is the latent grid side (tokens), not pixels.
    return DiTTransformer2DModel(in_channels=latent_channels, out_channels=latent_channels, sample_size=grid_size,
                                 patch_size=patch_size, num_embeds_ada_norm=num_classes, **config)


def disable_internal_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """diffusers' DiT drops labels inside every block independently; training drops them once per
    sample instead (``drop_labels``), as DiT does, so the blocks' own dropout is switched off."""
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def null_class(transformer: DiTTransformer2DModel) -> int:
    """The class id of the unconditional embedding (the last row of the class table)."""
    return int(transformer.config.num_embeds_ada_norm)


def drop_labels(labels: torch.Tensor, null_id: int, probability: float = CLASS_DROPOUT) -> torch.Tensor:
    """Labels with a ``probability`` share replaced by the null class (torch's global RNG)."""
    drop = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def training_scheduler(objective: str):
    """The noise schedule a model is trained with: DDPM (linear betas) or flow matching."""
    if objective == "ddpm":
        return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                             beta_end=0.02, prediction_type="epsilon", clip_sample=False)
    if objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")


def sampling_scheduler(objective: str):
    """The scheduler a pipeline samples with: DDIM for ``ddpm`` (same betas), Euler for ``flow``."""
    trained = training_scheduler(objective)
    if objective == "ddpm":
        return DDIMScheduler.from_config(trained.config, set_alpha_to_one=False)
    return trained


def is_flow(scheduler) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def diffusion_loss(transformer, objective: str, latents: torch.Tensor, labels: torch.Tensor,
                   scheduler=None) -> torch.Tensor:
    """The training loss on normalised latents (B, C, h, w) with (already dropped) labels: MSE to the
    noise (``ddpm``) or to the velocity ``noise - latents`` (``flow``). Noise and timesteps come from
    torch's global RNG (the Trainer seeds it per process and restores it on resume)."""
    batch = latents.shape[0]
    noise = torch.randn_like(latents)
    if objective == "ddpm":
        scheduler = scheduler or training_scheduler("ddpm")
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise
    elif objective == "flow":
        t = torch.rand(batch, device=latents.device)
        sigma = t.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        timesteps = t * NUM_TRAIN_TIMESTEPS
        target = noise - latents
    else:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    prediction = transformer(noisy, timestep=timesteps, class_labels=labels).sample
    return F.mse_loss(prediction.float(), target.float())


def guided_prediction(transformer, latents: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
    """The model output (float32) with classifier-free guidance (``classifier_free_guidance``, the GPT's
    formula) from one batched pass over conditional and null labels; ``s = 1`` runs the conditional pass alone."""
    batch = latents.shape[0]
    timesteps = timestep.expand(batch) if timestep.ndim else timestep.repeat(batch)
    if guidance_scale == 1:
        return transformer(latents, timestep=timesteps, class_labels=labels).sample.float()
    null = torch.full_like(labels, null_class(transformer))
    both = transformer(torch.cat([latents, latents]), timestep=torch.cat([timesteps, timesteps]),
                       class_labels=torch.cat([labels, null])).sample
    conditional, unconditional = both.float().chunk(2)  # guidance in float32: it scales rounding by s
    return classifier_free_guidance(conditional, unconditional, guidance_scale)


@torch.no_grad()
def sample_latents(transformer, scheduler, labels: torch.Tensor, *, num_inference_steps: int = 50,
                   guidance_scale: float = DEFAULT_DIT_GUIDANCE_SCALE, generator: torch.Generator | None = None,
                   progress=None) -> torch.Tensor:
    """Normalised latents (B, C, h, w) for class ``labels`` by integrating ``scheduler`` from noise.

    ``scheduler`` decides the objective: ``FlowMatchEulerDiscreteScheduler`` reads the output as a
    velocity, any DDPM-family scheduler (DDIM, DPM-Solver, ...) as the predicted noise. The start
    noise comes from diffusers' ``randn_tensor``: drawn where ``generator`` lives (a CPU generator gives
    the same noise for a model on any device; a CUDA one draws on the GPU). Latents and the scheduler's
    state stay float32 whatever the transformer's dtype (an Euler step adds ~2 % of |x|, which bf16
    storage would round away over 50 steps); only the transformer's input is cast.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
    if not 0 <= guidance_scale < math.inf:  # NaN and inf fail too
        raise ValueError(f"guidance_scale={guidance_scale} must be a finite number >= 0 (1 = no guidance)")
    config = transformer.config
    device, dtype = transformer.device, transformer.dtype
    shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    if not is_flow(scheduler):
        latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    labels = labels.to(device)
    steps = scheduler.timesteps
    scales_input = hasattr(scheduler, "scale_model_input")  # flow matching's Euler scheduler does not
    # Stochastic samplers (DDPM, DDIM with eta > 0) draw their noise from the same generator.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in (progress(steps) if progress else steps):
        model_input = scheduler.scale_model_input(latents, t) if scales_input else latents
        output = guided_prediction(transformer, model_input.to(dtype), t.to(device), labels, guidance_scale)
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
    return latents


__all__ = [
    "DIT_SIZES",
    "DEFAULT_DIT_GUIDANCE_SCALE",
    "OBJECTIVES",
    "build_transformer",
    "diffusion_loss",
    "disable_internal_label_dropout",
    "drop_labels",
    "guided_prediction",
    "is_flow",
    "null_class",
    "sample_latents",
    "sampling_scheduler",
    "training_scheduler",
]
