"""``fvq``: FVQ's VQBridge, a compress-process-recover network over the whole codebook.

The K x D base codebook is cut into K / G tokens of G consecutive codes each (compress: one
linear G*D -> width), processed by a few pre-LayerNorm transformer blocks, and mapped back to
K x D (recover: LayerNorm, linear width -> G*D). The recover layer starts near zero (the official
code: exactly zero), so C_hat starts near zero and grows from it. Because the map mixes all codes,
every code of the base codebook receives a gradient at every step, whichever codes were selected.
The recover layer is the exception: each of a token's G code slots has its own rows, which learn
only when that slot wins a token, so training revives a slot that wins none: the training loop
calls ``revive_dead_slots()`` after every optimiser step (``revive_after``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed import sum_over_processes
from .base import CodebookQuantizer
from .plain import plain_copy

GROUP_SIZES = (64, 16, 4, 1)  # P x P patches, P = 8, 4, 2, 1


def default_group_size(codebook_size: int) -> int:
    """Codes per bridge token, G: the paper keeps about 1,024 tokens (G = 16 at K = 16,384, 64 at
    65,536) and caps G at 64 (4,096 tokens at 262,144); below 16,384 that rule gives G = K / 1,024
    (1 at 1,024, 4 at 4,096). The largest of 64 / 16 / 4 / 1 that is at most K / 1,024 and divides K.

    G is not only a cost: each of a token's G code slots learns only when one of its codes is
    selected, so a large G at a small K leaves slots dead (benchmarks/README.md, lab notes).
    """
    return next(g for g in GROUP_SIZES if g <= max(1, codebook_size // 1024) and codebook_size % g == 0)


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
    """Pre-LayerNorm transformer block; LayerNorms without affine (unless ``norm_affine``), MLP ratio
    2, GELU-tanh."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 2.0, norm_affine: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=norm_affine, eps=1e-6)
        self.attn = BridgeAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=norm_affine, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


LAYOUTS = ("groups", "square")
# The bridge's hidden layers start as the official code's (xavier weights, zero biases) or PyTorch's.
BRIDGE_INITS = ("official", "pytorch")
# Every code slot's recover rows start from the same N(0, std^2) rows plus a tenth as much noise of
# their own (std 0: the official all-zero start, which leaves most slots unused; see
# benchmarks/README.md, "Lab notes behind the fvq defaults", for the runs behind these numbers).
RECOVER_INIT_STD = 0.002
RECOVER_SLOT_NOISE = 0.1
# Training revives a slot that no token selected for this many optimiser steps in a row (a dead
# slot never gets a gradient again); saved weights and inference stay the paper's.
REVIVE_AFTER_STEPS = 20


def sincos_position_embedding(width: int, side: int) -> torch.Tensor:
    """(side^2, width) fixed 2D sin-cos embedding of a row-major side x side token grid, laid out as
    MAE / DiT lay it out: [sin, cos] of the column index in the first half, of the row index in the
    second, frequencies 1 / 10000^(k / (width / 4))."""
    if width % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class VQBridge(nn.Module):
    """Maps a (K, D) codebook to (K, D); no positional embedding and no residual from the input.

    ``layout`` says which codes share a token: ``"groups"``: G consecutive codes (any K divisible by
    G); ``"square"``: the official code's, the codebook as a sqrt(K) x sqrt(K) image (code k at row
    k // sqrt(K), column k % sqrt(K)) cut into P x P patches, G = P^2. Both are the same model up to
    a fixed permutation of code indices; ``"square"`` keeps official checkpoints' indices.
    The recover layer starts near zero and alike for every code slot: the same N(0, ``recover_std``^2)
    rows for each slot plus a tenth as much noise of its own, zero bias (``recover_std=0``: exactly
    zero, as the official code; see ``RECOVER_INIT_STD``);
    ``init="official"`` starts the others as the official code (xavier-uniform weights, zero biases),
    ``"pytorch"`` keeps PyTorch's defaults.

    Options for FVQ's DiT-style bridge (its constant adaLN modulation folds into these exactly):
    ``norm_affine`` gives every LayerNorm a weight and bias; ``position_embedding`` adds a fixed 2D
    sin-cos embedding to the tokens (``"square"`` layout; ``num_codes`` sets the grid).
    """

    def __init__(self, codebook_dim: int, group_size: int, width: int, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 2.0, layout: str = "groups", norm_affine: bool = False,
                 position_embedding: bool = False, num_codes: int | None = None, init: str = "official",
                 recover_std: float = RECOVER_INIT_STD):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
        self.group_size, self.layout = group_size, layout
        self.patch_size = math.isqrt(group_size)
        if layout == "square" and self.patch_size**2 != group_size:
            raise ValueError(f"layout='square' needs group_size = P^2 (P x P patches), got {group_size}; "
                             "use 16, 64, ...")
        self.compress = nn.Linear(group_size * codebook_dim, width)
        self.blocks = nn.ModuleList(BridgeBlock(width, num_heads, mlp_ratio, norm_affine) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=norm_affine, eps=1e-6)
        self.recover = nn.Linear(width, group_size * codebook_dim)
        if init not in BRIDGE_INITS:
            raise ValueError(f"init={init!r} is not one of {BRIDGE_INITS}")
        if init == "official":  # xavier weights, zero biases (PyTorch's default keeps uniform biases)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        if recover_std < 0:
            raise ValueError(f"recover_std={recover_std} must be >= 0 (0: the official all-zero start)")
        with torch.no_grad():  # rows g * D + d produce dim d of slot g's codes: every slot starts alike
            shared = torch.randn(codebook_dim, width) * recover_std
            noise = torch.randn(group_size * codebook_dim, width) * (recover_std * RECOVER_SLOT_NOISE)
            self.recover.weight.copy_(shared.repeat(group_size, 1) + noise)
        nn.init.zeros_(self.recover.bias)
        if position_embedding:
            if layout != "square" or num_codes is None:
                raise ValueError("position_embedding needs layout='square' and num_codes (the codebook size)")
            side = math.isqrt(num_codes) // self.patch_size
            self.register_buffer("position_embedding", sincos_position_embedding(width, side))
        else:
            self.position_embedding = None

    def _tokens(self, codebook: torch.Tensor) -> torch.Tensor:
        num_codes, dim = codebook.shape
        if self.layout == "groups":
            return codebook.reshape(1, num_codes // self.group_size, self.group_size * dim)
        side, p = math.isqrt(num_codes), self.patch_size
        patches = codebook.reshape(side // p, p, side // p, p, dim).permute(0, 2, 1, 3, 4)
        return patches.reshape(1, (side // p) ** 2, p * p * dim)  # token features ordered (p, q, channel)

    def _codes(self, tokens: torch.Tensor, num_codes: int, dim: int) -> torch.Tensor:
        if self.layout == "groups":
            return tokens.reshape(num_codes, dim)
        side, p = math.isqrt(num_codes), self.patch_size
        image = tokens.reshape(side // p, side // p, p, p, dim).permute(0, 2, 1, 3, 4)
        return image.reshape(num_codes, dim)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        num_codes, dim = codebook.shape
        x = self.compress(self._tokens(codebook))
        if self.position_embedding is not None:
            x = x + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self._codes(self.recover(self.norm(x)), num_codes, dim)


class FVQQuantizer(CodebookQuantizer):
    """FVQ: trainable base codebook (uniform(-1/K, 1/K)) mapped through VQBridge, C_hat = f(C).

    Args:
        group_size: codes per bridge token, G; K must be divisible by it. Default: about 1,024
            tokens, G at most 64 (the paper's P = 4 at 16,384, P = 8 at 65,536 and 262,144; G = 1 at
            1,024, 4 at 4,096); see ``default_group_size``.
        width: bridge width; default ``codebook_dim`` (the paper's best: width equal to D).
        depth: transformer blocks (2 is best; 1 underfits, 4 degrades).
        num_heads: attention heads; default 4 (the official code's, at every width) where the
            width allows, else 1.
        layout: ``"groups"`` (G consecutive codes per token) or ``"square"`` (official P x P patches
            of the sqrt(K) x sqrt(K) codebook image; K a perfect square divisible by P^2).
        norm_affine, position_embedding: FVQ's DiT-style bridge (see ``VQBridge``); off in the paper's.
        init: ``"official"`` (xavier weights, zero biases, as the official code) or ``"pytorch"``.
        recover_std: std of the recover layer's initial weights (default 0.002; 0: all zero, as the
            official code, which leaves most of the G code slots unused in short runs).
        revive_after: in training, a code slot that no token selected for this many optimiser steps
            in a row restarts from a copy of the busiest slot (``REVIVE_AFTER_STEPS``, 20; 0: never)
            when ``revive_dead_slots()`` is called after the step. Counts are summed over processes,
            so every rank revives the same slots the same way.
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
        layout: str = "groups",
        norm_affine: bool = False,
        position_embedding: bool = False,
        init: str = "official",
        recover_std: float = RECOVER_INIT_STD,
        revive_after: int = REVIVE_AFTER_STEPS,
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
        if layout == "square":
            side, patch = math.isqrt(codebook_size), math.isqrt(group_size)
            if side * side != codebook_size or patch * patch != group_size or side % patch:
                raise ValueError(
                    f"layout='square' needs codebook_size a perfect square (got {codebook_size}) whose side is "
                    f"divisible by the patch side sqrt(group_size) (group_size={group_size}); use layout='groups'"
                )
        width = width or codebook_dim
        num_heads = num_heads or (4 if width % 4 == 0 else 1)
        self.group_size, self.layout = group_size, layout
        self.derived_settings = {"group_size": group_size, "width": width, "num_heads": num_heads}
        self.base_codebook = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.base_codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.bridge = VQBridge(codebook_dim, group_size, width, depth, num_heads, mlp_ratio, layout, norm_affine,
                               position_embedding, codebook_size, init, recover_std)
        if revive_after < 0:
            raise ValueError(f"revive_after={revive_after} must be >= 0 (0: never revive a dead code slot)")
        self.revive_after = revive_after
        self.slot_revivals = 0  # slots revived so far in this process (for logs and tests)
        # Optimiser steps in a row in which no token selected each slot; not saved with the weights.
        self.register_buffer("slot_idle_steps", torch.zeros(group_size, dtype=torch.long), persistent=False)
        self._step_counts: torch.Tensor | None = None  # slot counts of the training searches since the last step
        # Host bounds on the idle counts, so that most steps read nothing back from the GPU: the longest
        # idle run at the last read, and the steps since (each adds at most 1 to any slot's count).
        self._idle_at_read, self._steps_since_read = 0, 0

    def code_slots(self, indices: torch.Tensor) -> torch.Tensor:
        """The code slot (0 .. G-1: which rows of the recover layer made it) of each code index."""
        if self.layout == "groups":
            return indices % self.group_size
        side, patch = math.isqrt(self.codebook_size), self.bridge.patch_size
        return (indices // side % patch) * patch + indices % side % patch

    def quantize(self, z: torch.Tensor, codebook: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target, z_q, indices = super().quantize(z, codebook)
        # Count which slots the training searches select (a statistic: no weight changes here);
        # revive_dead_slots() reads the counts after the optimiser step.
        if self.training and torch.is_grad_enabled() and self.revive_after > 0 and self.group_size > 1:
            self._count_slots(indices)
        return target, z_q, indices

    @torch.compiler.disable
    @torch.no_grad()
    def _count_slots(self, indices: torch.Tensor) -> None:
        # index_add_, not bincount: CUDA bincount reads its input's range back to the host.
        slots = self.code_slots(indices.reshape(-1))
        counts = torch.zeros(self.group_size, dtype=torch.long, device=slots.device)
        counts.index_add_(0, slots, torch.ones_like(slots))
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts

    @torch.compiler.disable
    @torch.no_grad()
    def revive_dead_slots(self) -> int:
        """Call after each optimiser step in training: counts the finished step's idle code slots
        (summed over processes, so every rank agrees) and restarts each slot that no token selected
        for ``revive_after`` steps in a row from a copy of a busy slot's recover rows, plus noise
        seeded by the revival's number (the same on every process). Returns how many slots it revived.

        Every training search since the last call counts as one step (gradient accumulation,
        multi-scale); with no search since then (evaluation, a skipped step) nothing is counted.
        """
        if self._step_counts is None:
            return 0
        counts = sum_over_processes(self._step_counts)
        self._step_counts = None
        self.slot_idle_steps = torch.where(counts > 0, 0, self.slot_idle_steps + 1)
        self._steps_since_read += 1
        if self._idle_at_read + self._steps_since_read < self.revive_after:
            return 0  # no slot can have been idle long enough yet: nothing to read (no GPU sync)
        idle = self.slot_idle_steps.tolist()  # one small read, at most every few steps
        dead = [slot for slot, steps in enumerate(idle) if steps >= self.revive_after]
        self._idle_at_read = max([steps for steps in idle if steps < self.revive_after], default=0)
        self._steps_since_read = 0
        if not dead:
            return 0
        busiest = counts.argsort(descending=True)[: max(1, int((counts > 0).sum()))].tolist()
        rows = self.bridge.recover.weight.view(self.group_size, self.codebook_dim, -1)
        bias = self.bridge.recover.bias.view(self.group_size, self.codebook_dim)
        for number, slot in enumerate(dead):
            source = busiest[number % len(busiest)]
            generator = torch.Generator().manual_seed(self.slot_revivals)
            noise = torch.randn(rows[source].shape, generator=generator).to(rows)
            rows[slot] = rows[source] + noise * (RECOVER_SLOT_NOISE * rows[source].std())
            bias[slot] = bias[source]
            self.slot_idle_steps[slot] = 0
            self.slot_revivals += 1
        return len(dead)

    def codebook(self) -> torch.Tensor:
        return self._normalize(self.bridge(self.base_codebook.weight))

    export_plain = plain_copy

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, layout={self.layout!r}"
