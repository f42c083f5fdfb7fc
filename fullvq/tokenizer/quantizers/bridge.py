"""``fvq``: FVQ's VQBridge, a compress-process-recover network over the whole codebook.

The K x D base codebook is cut into K / G tokens of G consecutive codes each (compress: one
linear G*D -> width), processed by a few pre-LayerNorm transformer blocks, and mapped back to
K x D (recover: LayerNorm, linear width -> G*D). The recover layer starts at zero, so C_hat
starts at zero and grows from it. Because the map mixes all codes, every code of the base
codebook receives a gradient at every step, whichever codes were selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import CodebookQuantizer


def default_group_size(codebook_size: int) -> int:
    """The paper's codes per token: 16 up to K = 16,384 (1,024 tokens), 64 above (1,024 / 4,096)."""
    return 16 if codebook_size <= 16384 else 64


class BridgeAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"bridge width={width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class BridgeBlock(nn.Module):
    """Pre-LayerNorm transformer block; LayerNorms without affine, MLP ratio 2, GELU-tanh."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = BridgeAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VQBridge(nn.Module):
    """Maps a (K, D) codebook to (K, D); no positional embedding and no residual from the input."""

    def __init__(self, codebook_dim: int, group_size: int, width: int, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.group_size = group_size
        self.compress = nn.Linear(group_size * codebook_dim, width)
        self.blocks = nn.ModuleList(BridgeBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.recover = nn.Linear(width, group_size * codebook_dim)
        nn.init.zeros_(self.recover.weight)
        nn.init.zeros_(self.recover.bias)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        num_codes, dim = codebook.shape
        x = self.compress(codebook.reshape(1, num_codes // self.group_size, self.group_size * dim))
        for block in self.blocks:
            x = block(x)
        return self.recover(self.norm(x)).reshape(num_codes, dim)


class FVQQuantizer(CodebookQuantizer):
    """FVQ: trainable base codebook (uniform(-1/K, 1/K)) mapped through VQBridge, C_hat = f(C).

    Args:
        group_size: codes per bridge token, G; K must be divisible by it. Default: 16 for
            K <= 16,384, else 64 (the paper's P = 4 and P = 8).
        width: bridge width; default ``codebook_dim`` (the paper's best: width equal to D).
        depth: transformer blocks (2 is best; 1 underfits, 4 degrades).
        num_heads: attention heads; default ``max(1, width // 64)``.
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        group_size: int | None = None,
        width: int | None = None,
        depth: int = 2,
        num_heads: int | None = None,
        mlp_ratio: float = 2.0,
        **kwargs,
    ):
        super().__init__(codebook_size, codebook_dim, **kwargs)
        group_size = group_size or default_group_size(codebook_size)
        if codebook_size % group_size:
            multiple = (codebook_size // group_size + 1) * group_size
            raise ValueError(
                f"codebook_size={codebook_size} is not divisible by group_size={group_size}; choose a "
                f"multiple of {group_size} (e.g. {multiple}) or set group_size to a divisor of {codebook_size}"
            )
        width = width or codebook_dim
        num_heads = num_heads or max(1, width // 64)
        self.group_size = group_size
        self.base_codebook = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.base_codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.bridge = VQBridge(codebook_dim, group_size, width, depth, num_heads, mlp_ratio)

    def codebook(self) -> torch.Tensor:
        return self._normalize(self.bridge(self.base_codebook.weight))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
