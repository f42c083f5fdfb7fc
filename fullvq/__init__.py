"""fullvq: image tokenizers whose codebook is used in full, and the generators built on them."""

__version__ = "0.1.0"

from .tokenizer import CodebookUsage, FVQModel, build_quantizer  # noqa: E402

# Stage two pulls in transformers; import it only when asked for.
_LAZY = {
    "FullVQPipeline": "fullvq.pipelines.autoregressive",
    "LatentFlowPipeline": "fullvq.pipelines.latent_flow",
    "FullVQGPT": "fullvq.generator.gpt",
    "FullVQGPTConfig": "fullvq.generator.gpt",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fullvq' has no attribute {name!r}")


__all__ = ["FVQModel", "FullVQPipeline", "LatentFlowPipeline", "FullVQGPT", "FullVQGPTConfig", "CodebookUsage", "build_quantizer",
           "__version__"]
