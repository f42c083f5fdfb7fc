"""Stage one: image tokenizers (encoder -> quantizer -> decoder)."""

from .modeling import FVQModel, FVQModelOutput
from .quantizers import QUANTIZERS, CodebookUsage, build_quantizer, nearest_code

__all__ = ["FVQModel", "FVQModelOutput", "QUANTIZERS", "CodebookUsage", "build_quantizer", "nearest_code"]
