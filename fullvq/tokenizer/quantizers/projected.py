"""Quantizers whose codebook is a trainable map of a frozen table: ``simvq`` and ``lc``.

The map is applied to the whole table every step, so every code moves with every update
(dense codebook gradients), unlike plain VQ where only selected codes move.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...io import load_torch_file
from .base import CodebookQuantizer
from .plain import plain_copy


class SimVQQuantizer(CodebookQuantizer):
    """SimVQ: frozen random codebook C ~ N(0, 1/D) and a trainable linear map, C_hat = C W."""

    frozen_buffer_names = ("frozen_codebook",)  # seeded: the same on every process

    def __init__(self, codebook_size: int, codebook_dim: int, *, seed: int = 0, **kwargs):
        super().__init__(codebook_size, codebook_dim, **kwargs)
        generator = torch.Generator().manual_seed(seed)
        frozen = torch.randn(codebook_size, codebook_dim, generator=generator) * codebook_dim**-0.5
        self.register_buffer("frozen_codebook", frozen)
        self.codebook_projection = nn.Linear(codebook_dim, codebook_dim, bias=False)

    def codebook(self) -> torch.Tensor:
        return self._normalize(self.codebook_projection(self.frozen_codebook))

    export_plain = plain_copy


class LCQuantizer(CodebookQuantizer):
    """VQGAN-LC: a frozen N x feature_dim codebook of vision-encoder features and a projector.

    The table is filled by ``load_codebook`` (k-means centres from ``fullvq init-codebook``) and
    saved with the model, so ``from_pretrained`` needs no codebook file.
    """

    frozen_buffer_names = ("frozen_codebook",)  # every process loads the same file or checkpoint

    def __init__(self, codebook_size: int, codebook_dim: int, *, feature_dim: int = 768, **kwargs):
        super().__init__(codebook_size, codebook_dim, **kwargs)
        self.feature_dim = feature_dim
        self.register_buffer("frozen_codebook", torch.zeros(codebook_size, feature_dim))
        self.codebook_projection = nn.Linear(feature_dim, codebook_dim)
        self._codebook_checked = False

    @torch.no_grad()
    def load_codebook(self, source: torch.Tensor | str | os.PathLike) -> None:
        """Fill the frozen table from a (codebook_size, feature_dim) tensor or file.

        Files: ``.safetensors`` (key ``codebook``, or its only tensor), ``.pt``/``.pth`` (a tensor or
        a dict with ``codebook``; read with ``weights_only=True``) or ``.npy``.
        """
        tensor = source if isinstance(source, torch.Tensor) else read_codebook_file(Path(source))
        expected = (self.codebook_size, self.feature_dim)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"lc codebook has shape {tuple(tensor.shape)}, expected {expected} "
                f"(codebook_size x feature_dim); set codebook_size={tensor.shape[0]} and "
                f"feature_dim={tensor.shape[-1]} or rebuild the codebook with fullvq init-codebook"
            )
        if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
            raise ValueError(f"lc codebook must hold finite floating-point values, got dtype {tensor.dtype}")
        self.frozen_codebook.copy_(tensor)
        self._codebook_checked = False

    def codebook(self) -> torch.Tensor:
        if not self._codebook_checked:
            if not self.frozen_codebook.any():
                raise RuntimeError(
                    "the lc quantizer's frozen codebook is empty (all zeros); load the k-means "
                    "centres first with quantizer.load_codebook(path) (fullvq init-codebook makes them)"
                )
            self._codebook_checked = True
        return self._normalize(self.codebook_projection(self.frozen_codebook))

    export_plain = plain_copy

    def extra_repr(self) -> str:
        return super().extra_repr() + f", feature_dim={self.feature_dim}"


def read_codebook_file(path: Path) -> torch.Tensor:
    """A (N, feature_dim) codebook tensor from ``.safetensors`` (key ``codebook`` or the only tensor),
    ``.pt``/``.pth``/``.bin`` (a tensor or a dict with ``codebook``, read with ``weights_only=True``) or ``.npy``."""
    if not path.is_file():
        raise FileNotFoundError(f"lc codebook file {path} does not exist; make one with fullvq init-codebook")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "codebook" in tensors:
            return tensors["codebook"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise KeyError(f"{path} holds tensors {sorted(tensors)}; store the codebook under the key 'codebook'")
    if suffix in (".pt", ".pth", ".bin"):
        obj = load_torch_file(path)
        if isinstance(obj, dict):
            if "codebook" not in obj:
                raise KeyError(f"{path} holds keys {sorted(obj)}; store the codebook under the key 'codebook'")
            obj = obj["codebook"]
        return obj
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    raise ValueError(f"unsupported codebook file {path}; use .safetensors, .pt or .npy")
