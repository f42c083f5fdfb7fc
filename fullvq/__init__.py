"""fullvq: image tokenizers whose codebook is used in full, and the generators built on them."""

__version__ = "0.1.0"

from .tokenizer import CodebookUsage, FVQModel, build_quantizer  # noqa: E402

__all__ = ["FVQModel", "CodebookUsage", "build_quantizer", "__version__"]
