"""The single-codebook families by name: what residual and multi-scale quantizers wrap."""

from __future__ import annotations

from .base import CodebookQuantizer, recorded
from .bridge import FVQQuantizer
from .plain import VectorQuantizer
from .projected import LCQuantizer, SimVQQuantizer

CODEBOOK_FAMILIES: dict[str, type[CodebookQuantizer]] = {
    "vq": VectorQuantizer,
    "simvq": SimVQQuantizer,
    "lc": LCQuantizer,
    "fvq": FVQQuantizer,
}


def build_codebook_quantizer(name: str, **config) -> CodebookQuantizer:
    """The single-codebook family ``name`` built with ``config`` (recording both, see ``recorded``); a
    TypeError naming the family for a bad setting."""
    try:
        quantizer = CODEBOOK_FAMILIES[name](**config)
    except TypeError as error:
        raise TypeError(f"bad settings for quantizer {name!r}: {error}") from None
    return recorded(quantizer, name, config)


__all__ = ["CODEBOOK_FAMILIES", "build_codebook_quantizer"]
