"""Stage two: generators over a tokenizer's codes: the autoregressive GPT over token ids (ints in
[0, codebook_size)) and the optional DiT / flow model over quantized latents (``latent_flow``)."""

from .gpt import GPT_SIZES, FullVQGPT, FullVQGPTConfig, FullVQGPTOutput, GridRotaryEmbedding, swiglu_hidden_size
from .latent_flow import DEFAULT_DIT_GUIDANCE_SCALE, DIT_SIZES, build_transformer, sample_latents
from .sampling import DEFAULT_GUIDANCE_SCALE, build_logits_processor, classifier_free_guidance, guidance_scales, sample

__all__ = [
    "DIT_SIZES",
    "DEFAULT_DIT_GUIDANCE_SCALE",
    "DEFAULT_GUIDANCE_SCALE",
    "build_transformer",
    "sample_latents",
    "GPT_SIZES",
    "FullVQGPT",
    "FullVQGPTConfig",
    "FullVQGPTOutput",
    "GridRotaryEmbedding",
    "swiglu_hidden_size",
    "build_logits_processor",
    "classifier_free_guidance",
    "guidance_scales",
    "sample",
]
