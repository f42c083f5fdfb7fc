"""``multiscale``: VAR-style multi-scale residual quantization over any base quantizer family.

At scale s the remaining residual is area-downsampled to s x s, quantized with one codebook
shared by all scales, upsampled back (bicubic), refined by a small convolution phi and
subtracted. The decoder sees the sum over scales. Indices come out flattened scale by scale,
(B, sum(s * s)), the order a next-scale autoregressive model predicts them in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantizerOutput, check_latents, recorded, straight_through
from .families import CODEBOOK_FAMILIES, build_codebook_quantizer

DEFAULT_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def phi_assignment(num_scales: int, num_phi: int) -> list[int]:
    """Which phi refines each scale: the one whose tick in [0, 1] lies nearest the scale's position
    (VAR's sharing); empty when ``num_phi`` is 0."""
    if num_phi < 1:
        return []
    ticks = torch.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    positions = [i / max(1, num_scales - 1) for i in range(num_scales)]
    return [int((ticks - position).abs().argmin()) for position in positions]


class Phi(nn.Module):
    """VAR's refinement of an upsampled code map: (1 - ratio) * h + ratio * conv3x3(h)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """Args: ``scales`` (increasing side lengths, the last equal to the latent grid), ``num_phi``
    refinement convolutions shared across scales by position (0 disables them), ``phi_ratio``."""

    def __init__(self, codebook_size: int, codebook_dim: int, *, base: str = "vq",
                 scales: tuple[int, ...] | list[int] = DEFAULT_SCALES, num_phi: int = 4, phi_ratio: float = 0.5,
                 **base_kwargs):
        super().__init__()
        if base not in CODEBOOK_FAMILIES:
            raise ValueError(f"multiscale quantizer needs a single-codebook base, got base={base!r}; "
                             f"use one of {', '.join(CODEBOOK_FAMILIES)}")
        if base_kwargs.get("l2_norm"):
            raise ValueError("l2_norm=True does not compose with multi-scale residuals; drop l2_norm")
        scales = tuple(int(s) for s in scales)
        if not scales or any(b <= a for a, b in zip(scales, scales[1:], strict=False)) or scales[0] < 1:
            raise ValueError(f"scales must be increasing positive side lengths, got {scales}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.scales = scales
        self.quantizer = build_codebook_quantizer(base, codebook_size=codebook_size, codebook_dim=codebook_dim,
                                                  **base_kwargs)
        self.phi = nn.ModuleList(Phi(codebook_dim, phi_ratio) for _ in range(num_phi))
        self.phi_for_scale = phi_assignment(len(scales), num_phi)
        # With fewer scales than phis some phi serves no scale: it would get no gradient, which DDP
        # (find_unused_parameters=False) reports as an error on the second step. Freeze it instead of
        # dropping it, so saved models keep their weight names.
        for index, phi in enumerate(self.phi):
            if index not in self.phi_for_scale:
                phi.requires_grad_(False)

    def _refine(self, scale_index: int, h: torch.Tensor) -> torch.Tensor:
        if not len(self.phi):
            return h
        return self.phi[self.phi_for_scale[scale_index]](h)

    def _check_grid(self, height: int, width: int) -> None:
        if height != width or height != self.scales[-1]:
            raise ValueError(
                f"multiscale scales end at {self.scales[-1]} but the latent grid is {height}x{width}; "
                f"set scales to end at the grid side (e.g. ...,{height})"
            )

    def _upsample(self, x: torch.Tensor, side: int) -> torch.Tensor:
        return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bicubic")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_latents(z, self.codebook_dim)
        side = z.shape[-1]
        self._check_grid(z.shape[-2], side)
        rest = z.detach()
        z_hat = torch.zeros_like(z)
        indices, codebook_loss, commitment_loss = [], 0.0, 0.0
        codebook = self.quantizer.search_codebook()  # C_hat once for every scale
        for i, s in enumerate(self.scales):
            coarse = rest if s == side else F.interpolate(rest, size=(s, s), mode="area")
            _, z_q, index = self.quantizer.quantize(coarse, codebook)
            h = self._refine(i, self._upsample(z_q, side))
            z_hat = z_hat + h
            rest = rest - h.detach()
            indices.append(index.flatten(1))
            codebook_loss = codebook_loss + F.mse_loss(z_hat.float(), z.detach().float())
            commitment_loss = commitment_loss + F.mse_loss(z.float(), z_hat.detach().float())
        n = len(self.scales)
        codebook_loss, commitment_loss = codebook_loss / n, commitment_loss / n
        base = self.quantizer
        return QuantizerOutput(
            quantized=straight_through(z, z_hat),
            indices=torch.cat(indices, dim=1),
            loss=base.codebook_weight * codebook_loss + base.commitment_weight * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    def revive_dead_slots(self) -> int:
        """The shared quantizer's ``revive_dead_slots`` (call after each optimiser step): every scale's
        search since the last step counts as one step."""
        return self.quantizer.revive_dead_slots()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The summed code map (B, D, S, S) for flattened (B, sum(s * s)) indices."""
        lengths = [s * s for s in self.scales]
        if indices.ndim != 2 or indices.shape[1] != sum(lengths):
            raise ValueError(f"multiscale indices must be (B, {sum(lengths)}), got {tuple(indices.shape)}")
        side = self.scales[-1]
        parts = torch.split(indices, lengths, dim=1)
        codebook = self.quantizer.search_codebook()
        return sum(
            self._refine(i, self._upsample(self.quantizer.lookup(part.reshape(-1, s, s), codebook), side))
            for i, (s, part) in enumerate(zip(self.scales, parts, strict=True))
        )

    def export_plain(self) -> MultiScaleQuantizer:
        config = {"codebook_size": self.codebook_size, "codebook_dim": self.codebook_dim, "base": "vq",
                  "scales": list(self.scales), "num_phi": len(self.phi),
                  "phi_ratio": self.phi[0].ratio if len(self.phi) else 0.5, **self.quantizer.common_config()}
        plain = recorded(MultiScaleQuantizer(**config), "multiscale", config)
        plain.quantizer = self.quantizer.export_plain()
        plain.phi.load_state_dict(self.phi.state_dict())
        return plain.to(next(self.parameters()).device)
