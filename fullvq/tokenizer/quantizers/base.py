"""What every quantizer shares: chunked nearest-code search, straight-through, VQ losses, usage.

A quantizer maps a channel-first latent map ``z`` of shape ``(B, D, H, W)`` to a
``QuantizerOutput``: the straight-through quantized map, the code indices and its losses.
Families differ only in how they produce the effective codebook ``C_hat`` (``codebook()``):
a learnable table (``vq``), a map over a frozen table (``simvq``, ``lc``) or VQBridge (``fvq``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed import sum_over_processes
from ...precision import ieee_float32

# Largest (tokens x codes) block of float32 distances held at once: 2**26 = 256 MiB on a GPU, which
# wants few large blocks (each block is ~7 launches; at D = 8 smaller blocks left the loop
# launch-bound); 2**20 = 4 MiB on the CPU, where a block that stays in cache searched 1,536 tokens
# against 16,384 codes 2.9x faster than a 64 MiB one.
DEFAULT_MAX_BLOCK_ELEMENTS = 2**26
CPU_MAX_BLOCK_ELEMENTS = 2**20
# Tokens per block: 16,384 on a GPU (with 2**26 elements: 4,096 codes a block), 4,096 on the CPU.
DEFAULT_TOKEN_CHUNK = 2**14
CPU_TOKEN_CHUNK = 2**12


@dataclass
class QuantizerOutput:
    """Result of quantizing a latent map.

    quantized: (B, D, H, W) codes with straight-through gradient to the input.
    indices: long code indices; (B, H, W) for a single codebook, (B, H, W, Q) for residual
        quantizers, (B, L) for multi-scale ones.
    loss: weighted sum ``codebook_weight * codebook_loss + commitment_weight * commitment_loss``.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


@torch.compiler.disable  # a Python loop over blocks: compiled, it would unroll into a huge graph
@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    token_chunk: int | None = None,
    code_chunk: int | None = None,
    max_block_elements: int | None = None,
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of ``z``.

    Args:
        z: (N, D) vectors.
        codebook: (K, D) codes.
        token_chunk, code_chunk: block shape; by default at most 16,384 tokens on a GPU (4,096 on
            the CPU) and as many codes as fit in ``max_block_elements`` (default 2^26 on a GPU,
            2^20 on the CPU).

    Returns:
        (N,) long tensor equal to ``argmin_k ||z_n - c_k||^2`` (first index on ties), always in
        ``[0, K)``: a row of ``z`` holding NaN or inf gets code 0 (a diverging run then reaches its
        non-finite loss check instead of indexing outside the codebook).

    Extra memory is bounded by one ``token_chunk x code_chunk`` float32 block plus ``K`` code
    norms and ``N`` running minima, whatever ``K`` is: the ``N x K`` matrix is never built.
    ``||z||^2`` is constant per row, so the search minimises ``||c||^2 - 2 z.c`` with one GEMM
    per block; the search always runs in strict IEEE float32: also under autocast, and with TF32
    off for its GEMMs whatever ``torch.set_float32_matmul_precision`` says (TF32 flips near ties).
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code needs z (N, D) and codebook (K, D) with the same D; "
            f"got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    num_tokens, num_codes = z.shape[0], codebook.shape[0]
    # Zeros, not empty: a row whose distances are all NaN never improves on +inf and keeps code 0.
    indices = torch.zeros(num_tokens, dtype=torch.long, device=z.device)
    if num_tokens == 0:
        return indices
    on_cpu = z.device.type == "cpu"
    with torch.autocast(device_type=z.device.type, enabled=False), ieee_float32():
        z = z.float()
        codebook = codebook.float()
        code_sq = codebook.pow(2).sum(dim=1)
        token_chunk = token_chunk or min(num_tokens, CPU_TOKEN_CHUNK if on_cpu else DEFAULT_TOKEN_CHUNK)
        if max_block_elements is None:
            max_block_elements = CPU_MAX_BLOCK_ELEMENTS if on_cpu else DEFAULT_MAX_BLOCK_ELEMENTS
        code_chunk = code_chunk or max(1, min(num_codes, max_block_elements // token_chunk))
        block = torch.empty(token_chunk, code_chunk, dtype=torch.float32, device=z.device)
        for t0 in range(0, num_tokens, token_chunk):
            z_chunk = z[t0 : t0 + token_chunk]
            best = torch.full((z_chunk.shape[0],), math.inf, device=z.device)
            best_index = indices[t0 : t0 + token_chunk]
            for k0 in range(0, num_codes, code_chunk):
                c_chunk = codebook[k0 : k0 + code_chunk]
                out = block[: z_chunk.shape[0], : c_chunk.shape[0]]
                torch.addmm(code_sq[k0 : k0 + code_chunk], z_chunk, c_chunk.t(), alpha=-2.0, out=out)
                # Strict '<' keeps the earlier code on ties, as a full argmin does.
                if out.is_cuda:
                    value, index = out.min(dim=1)
                    better = value < best
                    best = torch.where(better, value, best)
                    best_index.copy_(torch.where(better, index + k0, best_index))
                else:
                    # On CPU a min without indices is ~3x faster than one with, and after the first
                    # blocks few rows still improve: take argmin only for those rows. Copying the rows
                    # out costs more than an argmin over them, so when many improve (every row in the
                    # first block) the argmin runs over the whole block instead.
                    value = out.amin(dim=1)
                    better = value < best
                    improved = int(better.sum())
                    if improved > out.shape[0] // 3:
                        best_index.copy_(torch.where(better, out.argmin(dim=1) + k0, best_index))
                        best = torch.where(better, value, best)
                    elif improved:
                        rows = better.nonzero().squeeze(1)
                        best_index[rows] = out.index_select(0, rows).argmin(dim=1) + k0
                        best[rows] = value[rows]
        finite = torch.isfinite(z).all(dim=1)
        indices = torch.where(finite, indices, 0)  # no host sync, unlike a masked assignment
    return indices


def vq_losses(z: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook loss (moves codes to the encoder output) and commitment loss (the reverse)."""
    codebook_loss = F.mse_loss(z_q.float(), z.detach().float())
    commitment_loss = F.mse_loss(z.float(), z_q.detach().float())
    return codebook_loss, commitment_loss


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value ``z_q``, gradient passed to ``z`` unchanged; in ``z``'s dtype.

    Computed in float32 and cast once, so a bf16 ``z`` gets the code rounded once to bf16 rather
    than ``z + round(z_q - z)``, which can land an ulp away from it.
    """
    if z.dtype == torch.float32 and z_q.dtype == torch.float32:
        return z + (z_q - z).detach()
    z32 = z.float()
    return (z32 + (z_q.float() - z32).detach()).to(z.dtype)


def check_latents(z: torch.Tensor, codebook_dim: int) -> None:
    if z.ndim != 4 or z.shape[1] != codebook_dim:
        raise ValueError(
            f"quantizer expects latents of shape (B, {codebook_dim}, H, W), got {tuple(z.shape)}; "
            f"project the encoder output to codebook_dim={codebook_dim} channels first"
        )


class CodebookQuantizer(nn.Module):
    """Base class of single-codebook quantizers.

    Subclasses implement ``codebook()``, the effective (K, D) codebook C_hat used for search and
    lookup, and may override ``export_plain()``. Everything else is shared. ``frozen_buffer_names``
    lists buffers that never change and are built alike on every process (DDP skips them).
    """

    frozen_buffer_names: tuple[str, ...] = ()

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        l2_norm: bool = False,
    ):
        super().__init__()
        if codebook_size < 1 or codebook_dim < 1:
            raise ValueError(
                f"codebook_size and codebook_dim must be positive, got {codebook_size} and {codebook_dim}"
            )
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.codebook_weight = codebook_weight
        self.commitment_weight = commitment_weight
        self.l2_norm = l2_norm

    def codebook(self) -> torch.Tensor:
        raise NotImplementedError

    def search_codebook(self) -> torch.Tensor:
        """``codebook()`` computed outside autocast: the C_hat that search and lookup use.

        Under bf16 autocast a mapped codebook (fvq's bridge, simvq / lc's projection) would come out
        of bf16 linears, so training would search other codes than an fp32 model (cache-tokens,
        eval, export) does for the same latents. In float32 it is K x D work per step, a few ms at
        262,144 x 256 on a GPU.
        """
        device_type = next(iter(self.parameters()), torch.empty(0)).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.codebook()

    def common_config(self) -> dict:
        """The settings every family shares (kept when exporting to a plain codebook)."""
        return {
            "codebook_weight": self.codebook_weight,
            "commitment_weight": self.commitment_weight,
            "l2_norm": self.l2_norm,
        }

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_norm else x

    def quantize(self, z: torch.Tensor, codebook: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hard quantization without straight-through.

        Returns ``(target, z_q, indices)``: the latents as searched ((B, D, H, W), l2-normalised
        when ``l2_norm``), the selected codes (differentiable w.r.t. the codebook, in the codebook's
        dtype) and (B, H, W) indices. Wrappers (residual, multi-scale) build on this, and pass
        ``codebook`` (from ``search_codebook()``) to compute C_hat once for many calls.
        """
        check_latents(z, self.codebook_dim)
        b, d, h, w = z.shape
        flat = self._normalize(z.permute(0, 2, 3, 1).reshape(-1, d))
        codebook = self.search_codebook() if codebook is None else codebook
        indices = nearest_code(flat, codebook)
        z_q = F.embedding(indices, codebook)
        to_map = lambda x: x.reshape(b, h, w, d).permute(0, 3, 1, 2)  # noqa: E731
        return to_map(flat), to_map(z_q), indices.reshape(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        target, z_q, indices = self.quantize(z)
        codebook_loss, commitment_loss = vq_losses(target, z_q)
        return QuantizerOutput(
            quantized=straight_through(target, z_q),
            indices=indices,
            loss=self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    def revive_dead_slots(self) -> int:
        """Called after each optimiser step in training; families that revive unused parts of their
        codebook map do it here (``fvq``). Returns how many parts it revived: none by default."""
        return 0

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Codes for (B, H, W) indices, as a (B, D, H, W) map (``codebook``: a precomputed C_hat)."""
        check_indices(indices, self.codebook_size)
        codebook = self.search_codebook() if codebook is None else codebook
        return F.embedding(indices.long(), codebook).permute(0, 3, 1, 2)

    def export_plain(self) -> CodebookQuantizer:
        """A plain ``vq`` quantizer holding ``codebook()`` as its table (no projector); every family
        defines it (the mapped ones with ``plain.plain_copy``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define export_plain()")

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, l2_norm={self.l2_norm}"


def recorded(quantizer: nn.Module, name: str, config: dict) -> nn.Module:
    """``quantizer`` with the family ``name`` and ``config`` it was built from, so that a model can
    write them into its config (``FVQModel.export_plain``)."""
    quantizer.build_name = name
    quantizer.build_config = dict(config)
    return quantizer


def check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"code indices must be an integer tensor, got {indices.dtype}; pass indices.long()")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"code indices must lie in [0, {codebook_size}), got values in "
            f"[{int(indices.min())}, {int(indices.max())}]; were they made with another codebook?"
        )


class CodebookUsage:
    """Counts how often each code is selected, over every token it is shown.

    A bincount, never a sample buffer, so usage over an evaluation set is exact. ``all_reduce()``
    sums the counts of all processes (torch.distributed) before reading figures on many GPUs.
    """

    def __init__(self, codebook_size: int, device: torch.device | str | None = None):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """Add the codes of ``indices`` (any shape) to the counts; no host sync on a GPU."""
        flat = indices.detach().reshape(-1).to(self.counts.device, torch.long)
        if flat.device.type == "cpu":
            check_indices(flat, self.codebook_size)
            self.counts += torch.bincount(flat, minlength=self.codebook_size)
            return
        # CUDA bincount reads min and max back to the host (2 syncs per call); index_add_ needs none,
        # and the range check becomes a device-side assert instead of a read-back.
        if flat.numel():
            torch._assert_async(((flat >= 0) & (flat < self.codebook_size)).all(),
                                f"code indices must lie in [0, {self.codebook_size})")
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def all_reduce(self) -> CodebookUsage:
        sum_over_processes(self.counts)
        return self

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def used_codes(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def dead_codes(self) -> int:
        return self.codebook_size - self.used_codes

    @property
    def usage(self) -> float:
        """Fraction of codes selected at least once."""
        return self.used_codes / self.codebook_size

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code frequencies: the effective number of codes in use."""
        total = self.total
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return float(torch.exp(-(p * p.log()).sum()))

    def summary(self) -> dict[str, float | int]:
        return {
            "usage": self.usage,
            "perplexity": self.perplexity,
            "used_codes": self.used_codes,
            "dead_codes": self.dead_codes,
            "codebook_size": self.codebook_size,
            "tokens": self.total,
        }
