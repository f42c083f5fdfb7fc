"""Stage two: autoregressive generators over image tokens (token ids are ints in [0, codebook_size))."""

from .gpt import GPT_SIZES, FullVQGPT, FullVQGPTConfig, FullVQGPTOutput, GridRotaryEmbedding, swiglu_hidden_size
from .sampling import build_logits_processor, classifier_free_guidance, guidance_scales, sample

__all__ = [
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
