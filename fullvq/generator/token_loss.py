"""Next-token cross-entropy over a large codebook without holding all the logits at once.

At 262,144 codes a (32, 256, K) float32 logits tensor is 8.6 GB, and a plain loss keeps several
copies (the logits, their float32 cast, the saved log-softmax); the chunked loss holds one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of float32 logits per chunk of the chunked loss: 2**26 elements = 256 MiB whatever the codebook.
LOSS_CHUNK_ELEMENTS = 2**26


def _hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ((logits.argmax(-1) == labels) & (labels != -100)).sum()


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of the targets (not -100) whose argmax is right, as a float32 tensor (no host read)."""
    return _hits(logits, labels).float() / (labels != -100).sum().clamp_min(1).float()


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), _hits(logits.detach(), labels)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` (hidden (B, N, H), weight (K, H)) against ``labels``
    (B, N; -100 = ignore), and the token accuracy, without holding all (B, N, K) logits at once.

    Each chunk of rows is recomputed in the backward pass (activation checkpointing), so only one
    chunk's float32 logits exist at a time; the result equals the unchunked loss up to summation order.
    """
    from torch.utils.checkpoint import checkpoint

    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk_rows = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    total = flat.new_zeros((), dtype=torch.float32)
    hits = torch.zeros((), dtype=torch.long, device=flat.device)
    for start in range(0, len(targets), chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and flat.requires_grad:
            loss, correct = checkpoint(_chunk_loss, flat[rows], weight, targets[rows], use_reentrant=False)
        else:
            loss, correct = _chunk_loss(flat[rows], weight, targets[rows])
        total, hits = total + loss, hits + correct
    count = (targets != -100).sum()
    return total / count, hits.float() / count.clamp_min(1).float()
