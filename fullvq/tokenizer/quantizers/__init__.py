"""Quantizer families behind one registry: ``build_quantizer(name, **config)``.

Adding a family is one new file and one line in ``QUANTIZERS``.
"""

from __future__ import annotations

from torch import nn

from .base import CodebookQuantizer, CodebookUsage, QuantizerOutput, nearest_code
from .bridge import FVQQuantizer, VQBridge
from .multiscale import MultiScaleQuantizer
from .plain import VectorQuantizer
from .projected import LCQuantizer, SimVQQuantizer
from .residual import ResidualQuantizer

QUANTIZERS: dict[str, type[nn.Module]] = {
    "vq": VectorQuantizer,
    "simvq": SimVQQuantizer,
    "lc": LCQuantizer,
    "fvq": FVQQuantizer,
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
    quantizer.build_name = name
    quantizer.build_config = dict(config)
    return quantizer


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
