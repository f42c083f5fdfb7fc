"""Quantizer families behind one registry: ``build_quantizer(name, **config)``.

Adding a family is one new file and one line in ``CODEBOOK_FAMILIES`` (``families.py``; a wrapper
of other families: in ``QUANTIZERS``). Families compose by class: nothing here is re-entered lazily.
"""

from __future__ import annotations

from torch import nn

from .base import CodebookQuantizer, CodebookUsage, QuantizerOutput, nearest_code, recorded
from .bridge import FVQQuantizer, VQBridge
from .families import CODEBOOK_FAMILIES
from .multiscale import MultiScaleQuantizer
from .plain import VectorQuantizer
from .projected import LCQuantizer, SimVQQuantizer
from .residual import ResidualQuantizer

# Single-codebook families (families.py), then the wrappers that compose any of them.
QUANTIZERS: dict[str, type[nn.Module]] = {
    **CODEBOOK_FAMILIES,
    "residual": ResidualQuantizer,
    "multiscale": MultiScaleQuantizer,
}


def build_quantizer(name: str, **config) -> nn.Module:
    """Build the quantizer family ``name`` with ``config`` (codebook_size, codebook_dim, ...).

    The returned module records ``build_name`` and ``build_config`` so it can be rebuilt.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of: {', '.join(QUANTIZERS)}")
    try:
        quantizer = QUANTIZERS[name](**config)
    except TypeError as error:
        raise TypeError(f"bad settings for quantizer {name!r}: {error}") from None
    return recorded(quantizer, name, config)


__all__ = [
    "QUANTIZERS",
    "build_quantizer",
    "nearest_code",
    "CodebookQuantizer",
    "CodebookUsage",
    "QuantizerOutput",
    "VectorQuantizer",
    "SimVQQuantizer",
    "LCQuantizer",
    "FVQQuantizer",
    "VQBridge",
    "ResidualQuantizer",
    "MultiScaleQuantizer",
]
