"""``residual``: residual VQ over any base quantizer family.

Level i quantizes what levels 0..i-1 left over; the image is decoded from the sum of all
levels' codes. Indices come out as (B, H, W, num_quantizers).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantizerOutput, check_latents, recorded, straight_through, vq_losses
from .families import CODEBOOK_FAMILIES, build_codebook_quantizer


class ResidualQuantizer(nn.Module):
    """``num_quantizers`` levels, each its own ``base`` quantizer (own codebook and projector)."""

    def __init__(self, codebook_size: int, codebook_dim: int, *, base: str = "vq", num_quantizers: int = 4,
                 **base_kwargs):
        super().__init__()
        if base not in CODEBOOK_FAMILIES:
            raise ValueError(f"residual quantizer needs a single-codebook base, got base={base!r}; "
                             f"use one of {', '.join(CODEBOOK_FAMILIES)}")
        if base_kwargs.get("l2_norm"):
            raise ValueError("l2_norm=True does not compose with residual quantization (residuals are not unit "
                             "vectors); drop l2_norm or use a single quantizer")
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.levels = nn.ModuleList(
            build_codebook_quantizer(base, codebook_size=codebook_size, codebook_dim=codebook_dim, **base_kwargs)
            for _ in range(num_quantizers)
        )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_latents(z, self.codebook_dim)
        residual, total, indices = z, torch.zeros_like(z), []
        loss = codebook_loss = commitment_loss = 0.0
        for level in self.levels:
            target, z_q, index = level.quantize(residual)
            level_codebook, level_commitment = vq_losses(target, z_q)
            loss = loss + level.codebook_weight * level_codebook + level.commitment_weight * level_commitment
            codebook_loss = codebook_loss + level_codebook
            commitment_loss = commitment_loss + level_commitment
            total = total + z_q
            residual = residual - z_q.detach()
            indices.append(index)
        n = len(self.levels)
        return QuantizerOutput(
            quantized=straight_through(z, total),
            indices=torch.stack(indices, dim=-1),
            loss=loss / n,
            codebook_loss=codebook_loss / n,
            commitment_loss=commitment_loss / n,
        )

    def revive_dead_slots(self) -> int:
        """Each level's ``revive_dead_slots`` (call after each optimiser step); returns the total."""
        return sum(level.revive_dead_slots() for level in self.levels)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of every level's codes for (B, H, W, num_quantizers) indices."""
        if indices.ndim != 4 or indices.shape[-1] != len(self.levels):
            raise ValueError(f"residual indices must be (B, H, W, {len(self.levels)}), got {tuple(indices.shape)}")
        return sum(level.lookup(indices[..., i]) for i, level in enumerate(self.levels))

    def export_plain(self) -> ResidualQuantizer:
        plain_levels = [level.export_plain() for level in self.levels]
        config = {"codebook_size": self.codebook_size, "codebook_dim": self.codebook_dim, "base": "vq",
                  "num_quantizers": len(self.levels), **self.levels[0].common_config()}
        plain = recorded(ResidualQuantizer(**config), "residual", config)
        plain.levels = nn.ModuleList(plain_levels)
        return plain
