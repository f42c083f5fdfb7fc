"""``vq``: the plain learnable codebook (VQ-VAE / VQGAN / LlamaGen)."""

from __future__ import annotations

import torch
from torch import nn

from .base import CodebookQuantizer, recorded


class VectorQuantizer(CodebookQuantizer):
    """Learnable K x D codebook, initialised uniform(-1/K, 1/K).

    Only the selected codes receive a gradient, which is why most of a large codebook dies.
    ``l2_norm=True`` with a small ``codebook_dim`` (e.g. 16384 x 8) is LlamaGen's VQ-16: codes and
    latents are compared on the unit sphere.
    """

    def __init__(self, codebook_size: int, codebook_dim: int, **kwargs):
        super().__init__(codebook_size, codebook_dim, **kwargs)
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        return self._normalize(self.embedding.weight)

    @classmethod
    def like(cls, quantizer: CodebookQuantizer) -> VectorQuantizer:
        """An untrained plain quantizer with ``quantizer``'s size and shared settings."""
        config = {"codebook_size": quantizer.codebook_size, "codebook_dim": quantizer.codebook_dim,
                  **quantizer.common_config()}
        return recorded(cls(**config), "vq", config)

    def export_plain(self) -> VectorQuantizer:
        # Copy the raw table: re-normalising an already normalised one could move codes by an ulp.
        plain = VectorQuantizer.like(self)
        plain.load_state_dict(self.state_dict())
        return plain.to(self.embedding.weight.device)


def plain_copy(quantizer: CodebookQuantizer) -> VectorQuantizer:
    """``export_plain`` of the families that map a table (simvq, lc, fvq): a plain ``vq`` quantizer
    holding ``quantizer.codebook()`` (in float32, as the search uses it) as its table, with the same
    indices and codes."""
    plain = VectorQuantizer.like(quantizer)
    with torch.no_grad():
        codebook = quantizer.search_codebook()
        plain.embedding.weight.copy_(codebook)
    return plain.to(codebook.device)
