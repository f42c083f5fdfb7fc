"""Sampling image tokens from a :class:`~fullvq.generator.gpt.FullVQGPT`: KV-cached decoding with
classifier-free guidance, temperature, top-k and top-p (transformers' logits warpers).

On a GPU every per-token step stays on the device: the draw uses a device generator seeded once per
call, the logits are read by no host code, and (by default) the KV cache is transformers'
``StaticCache`` with the decoding step compiled into a CUDA graph.
"""

from __future__ import annotations

import math
import weakref

import torch
from transformers import (
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

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


def device_generator(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """The generator to draw with on ``device``: ``generator`` itself when it lives there, else a
    generator on ``device`` seeded by one draw from it (``None`` stays ``None``: the global RNG).

    So a CPU generator, what diffusers-style callers pass, drives device-side sampling: the same
    seed gives the same tokens on every run on the same kind of device, with no per-token copy of
    the probabilities to the host (at 64 x 16,384 that copy and CPU draw took 22.6 ms per token).
    """
    device = torch.device(device)
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def draw_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of warped ``logits`` (B, K): argmax at temperature 0, else a draw from
    ``softmax(logits)`` on the logits' device.

    The draw is ``argmax(p / q)`` with ``q ~ Exp(1)``: the exponential race, the same computation
    (and random numbers) as ``torch.multinomial(p, 1)``, without its validity checks that read back
    to the host. ``generator`` must live on the logits' device (see :func:`device_generator`).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div_(race).argmax(dim=-1)


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
    static_cache: bool | None = None,
    compile_decode: bool | None = None,
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
        generator: a ``torch.Generator`` for reproducible draws, on any device; draws happen on the
            model's device (see :func:`device_generator`), so on a GPU a CPU generator gives other
            tokens than on the CPU, and the same ones on every run.
        use_cache: decode one token per step with a KV cache; ``False`` recomputes the whole sequence
            each step (slower, same tokens).
        static_cache: preallocate the KV cache (transformers' ``StaticCache``) instead of growing it
            each token; default: on for CUDA. The cache is kept with the model for the next call of
            the same batch size (:func:`release_decoder` frees it).
        compile_decode: run the decoding step through ``torch.compile`` (CUDA graphs on a GPU); needs
            the static cache; default: on for CUDA. The first call per batch size pays the compile.
        progress: wraps the token steps to show progress (e.g. a pipeline's ``progress_bar``).

    Returns:
        (B, h * w) long token ids in raster order; ``.view(B, h, w)`` gives the grid.
    """
    config = model.config
    labels = torch.as_tensor(class_labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"class_labels must be a list or 1D tensor of integer ids, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):  # one check per call, not per token
        bad = labels[(labels < 0) | (labels >= config.num_classes)].unique()[:10].tolist()
        raise ValueError(
            f"class_labels {bad} are outside [0, {config.num_classes}): the model has num_classes={config.num_classes}"
        )
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale} must be a finite number (1 = no guidance)")
    on_gpu = model.device.type == "cuda"
    static_cache = on_gpu if static_cache is None else static_cache
    compile_decode = (on_gpu and static_cache) if compile_decode is None else compile_decode
    if compile_decode and not (use_cache and static_cache):
        raise ValueError("compile_decode=True needs use_cache=True and static_cache=True (a growing cache would "
                         "recompile at every token); turn compile_decode off or the static cache on")
    scales = guidance_scales(guidance_scale, config.num_image_tokens, guidance_schedule)
    processor = build_logits_processor(temperature, top_k, top_p)
    mode = "none" if not use_cache else "static" if static_cache else "dynamic"
    was_training = model.training
    model.eval()
    try:
        return _decode(model, labels.to(model.device).long(), scales if guidance_scale != 1 else None, processor,
                       temperature, device_generator(generator, model.device), mode, compile_decode, progress)
    finally:
        model.train(was_training)


def _decode(model, labels, scales, processor, temperature, generator, mode="dynamic", compile_decode=False,
            progress=None) -> torch.LongTensor:
    """The decoding loop; ``scales`` (one per token) turns on classifier-free guidance, ``None`` = off;
    ``mode``: ``"dynamic"`` / ``"static"`` KV cache or ``"none"``; ``generator`` on the model's device;
    ``progress`` wraps the token steps."""
    batch_size, num_tokens = len(labels), model.config.num_image_tokens
    guided = scales is not None
    if guided:
        scales = scales.tolist()
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    tokens = labels.new_zeros(batch_size, num_tokens)
    head = model.lm_head.weight.float()  # once per call: the head runs in float32 (see next_token_logits)
    next_hidden = _stepper(model, labels, guided, mode, compile_decode)
    steps = range(num_tokens)
    for step in (progress(steps) if progress else steps):
        logits = model.next_token_logits(next_hidden(step, tokens), head)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(cond, uncond, scales[step])
        tokens[:, step] = draw_tokens(processor(tokens[:, :step], logits), temperature, generator)
    return tokens


def _stepper(model, labels, guided: bool, mode: str, compile_decode: bool):
    """``next_hidden(step, tokens)``: the last hidden state (rows, hidden) that predicts token ``step``."""
    device = labels.device

    def both_halves(x):  # the conditional and the null-class rows see the same tokens
        return x.repeat(2, 1) if guided else x

    if mode == "none":
        return lambda step, tokens: model.trunk(input_ids=both_halves(tokens[:, :step]), class_labels=labels)[0][:, -1]
    cache, step_fn = _static_decoder(model, len(labels), compile_decode) if mode == "static" else (None, None)
    step_fn = step_fn or type(model).decode_step  # called with the model first (no bound method kept)
    state = {"cache": cache}

    def next_hidden(step: int, tokens: torch.Tensor) -> torch.Tensor:
        if step == 0:
            hidden, state["cache"] = model.trunk(class_labels=labels, past_key_values=state["cache"], use_cache=True)
            return hidden[:, -1]
        # Token step - 1 sits at sequence position step (position 0 is the class prefix).
        position = torch.full((1, 1), step, dtype=torch.long, device=device)
        return step_fn(model, both_halves(tokens[:, step - 1 : step]), position, state["cache"])

    return next_hidden


# One static cache (and compiled step) per model, reused by the next call of the same batch size:
# compiled CUDA graphs are recorded against the cache's fixed addresses. Keyed weakly, and holding no
# reference back to the model (the compiled step is the class's function), so it goes with the model.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_decoder(model, rows: int, compile_decode: bool):
    """A reset ``StaticCache`` for ``rows`` sequences and the step function to run on it (``None``: the
    plain ``decode_step``; else ``step_fn(model, input_ids, position_ids, cache)``)."""
    key = (rows, model.dtype, model.device, compile_decode)
    found = _DECODERS.get(model)
    if found is None or found[0] != key:
        cache = StaticCache(config=model.model.config, max_cache_len=1 + model.config.num_image_tokens)
        step_fn = None
        if compile_decode:
            step_fn = torch.compile(type(model).decode_step, fullgraph=True, dynamic=False,
                                    **decode_compile_options(model.device))
        found = _DECODERS[model] = (key, cache, step_fn)
    _, cache, step_fn = found
    cache.reset()
    return cache, step_fn


def decode_compile_options(device: torch.device) -> dict:
    """``torch.compile`` settings for the decoding step: CUDA graphs (``mode="reduce-overhead"``) on a
    GPU, where a GPT-XL token is ~2,100 small kernels; inductor's defaults elsewhere."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def release_decoder(model) -> None:
    """Free the static KV cache and compiled step that :func:`sample` keeps for ``model``."""
    _DECODERS.pop(model, None)
