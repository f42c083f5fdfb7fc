"""Sampling image tokens from a :class:`~fullvq.generator.gpt.FullVQGPT`: KV-cached decoding with
classifier-free guidance, temperature, top-k and top-p (transformers' logits warpers)."""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

GUIDANCE_SCHEDULES = ("constant", "linear")
# The one default classifier-free guidance scale of GPT sampling (FullVQPipeline, `fullvq sample`,
# gFID): the setting of the FVQ paper's and LlamaGen's gFID runs. `sample()` itself defaults to 1
# (no guidance), the plain conditional model.
DEFAULT_GUIDANCE_SCALE = 2.0


def guidance_scales(guidance_scale: float, num_tokens: int, schedule: str = "constant") -> torch.Tensor:
    """Guidance scale for each of ``num_tokens`` positions, (num_tokens,) float32.

    ``"constant"``: ``guidance_scale`` everywhere. ``"linear"``: a ramp from 1 (no guidance) at the
    first token to ``guidance_scale`` at the last, so guidance grows as the image takes shape.
    """
    if schedule == "constant":
        return torch.full((num_tokens,), float(guidance_scale))
    if schedule == "linear":
        return torch.linspace(1.0, float(guidance_scale), num_tokens)
    raise ValueError(f"guidance_schedule={schedule!r} must be one of {GUIDANCE_SCHEDULES}")


def classifier_free_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``, written as ``cond + (scale - 1) * (cond - uncond)`` so
    that scale 1 returns the conditional logits exactly."""
    return cond_logits + (scale - 1) * (cond_logits - uncond_logits)


def build_logits_processor(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """transformers' warpers for ``temperature`` (> 0; 1 = off), ``top_k`` (0 = off), ``top_p`` (1 = off)."""
    if not temperature >= 0 or not math.isfinite(temperature):  # NaN fails both comparisons
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 = off)")
    processors = LogitsProcessorList()
    if temperature not in (0, 1):
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1:
        processors.append(TopPLogitsWarper(top_p=float(top_p)))
    return processors


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of warped ``logits`` (B, K): argmax at temperature 0, else a multinomial draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    # Draw on the generator's device, so a CPU generator gives the same tokens for a model on any device.
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(probs.device)


@torch.no_grad()
def sample(
    model,
    class_labels: torch.Tensor | list[int],
    *,
    guidance_scale: float = 1.0,
    guidance_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress=None,
) -> torch.LongTensor:
    """Sample one token grid per class label.

    Args:
        model: a :class:`~fullvq.generator.gpt.FullVQGPT` (run in eval mode; its mode is restored after).
        class_labels: B ids in [0, num_classes).
        guidance_scale: classifier-free guidance scale; 1 = plain conditional sampling (no
            unconditional pass). Otherwise each step runs one batch of [conditional; null-class] rows.
        guidance_schedule: ``"constant"`` or ``"linear"`` (see :func:`guidance_scales`).
        temperature, top_k, top_p: see :func:`build_logits_processor`; temperature 0 is greedy.
        generator: a ``torch.Generator`` for reproducible draws (on any device).
        use_cache: decode one token per step with a KV cache; ``False`` recomputes the whole sequence
            each step (slower, same tokens).
        progress: wraps the token steps to show progress (e.g. a pipeline's ``progress_bar``).

    Returns:
        (B, h * w) long token ids in raster order; ``.view(B, h, w)`` gives the grid.
    """
    config = model.config
    labels = torch.as_tensor(class_labels, device=model.device)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"class_labels must be a list or 1D tensor of integer ids, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        bad = labels[(labels < 0) | (labels >= config.num_classes)].unique()[:10].tolist()
        raise ValueError(
            f"class_labels {bad} are outside [0, {config.num_classes}): the model has num_classes={config.num_classes}"
        )
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale} must be a finite number (1 = no guidance)")
    scales = guidance_scales(guidance_scale, config.num_image_tokens, guidance_schedule)
    processor = build_logits_processor(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, labels.long(), scales if guidance_scale != 1 else None, processor, temperature,
                       generator, use_cache, progress)
    finally:
        model.train(was_training)


def _decode(model, labels, scales, processor, temperature, generator, use_cache, progress=None) -> torch.LongTensor:
    """The decoding loop; ``scales`` (one per token) turns on classifier-free guidance, ``None`` = off."""
    batch_size, num_tokens = len(labels), model.config.num_image_tokens
    guided = scales is not None
    if guided:
        scales = scales.tolist()
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    tokens = labels.new_empty(batch_size, 0)
    cache = None
    steps = range(num_tokens)
    for step in (progress(steps) if progress else steps):
        if not use_cache:
            rows = tokens.repeat(2, 1) if guided else tokens  # both halves see the same tokens
            logits = model(input_ids=rows, class_labels=labels).logits[:, -1]
        elif step == 0:
            out = model(class_labels=labels, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values
        else:
            last = tokens[:, -1:].repeat(2, 1) if guided else tokens[:, -1:]
            out = model(input_ids=last, past_key_values=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values
        logits = logits.float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(cond, uncond, scales[step])
        next_token = _draw(processor(tokens, logits), temperature, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens
