"""fullvq: image tokenizers whose codebook is used in full, and the generators built on them.

Every public name is imported on first use, so ``import fullvq`` (and ``fullvq --help``) pulls in
neither torch nor diffusers. Saved pipeline folders name their components by module path
(``["fullvq.tokenizer.modeling", "FVQModel"]``, ``["fullvq.generator.gpt", "FullVQGPT"]``): those
modules stay where they are (``tests/test_saved_folders.py``).
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "FVQModel": "fullvq.tokenizer.modeling",
    "CodebookUsage": "fullvq.tokenizer.quantizers",
    "build_quantizer": "fullvq.tokenizer.quantizers",
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


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["FVQModel", "FullVQPipeline", "LatentFlowPipeline", "FullVQGPT", "FullVQGPTConfig", "CodebookUsage",
           "build_quantizer", "__version__"]
