"""Lloyd's k-means with k-means++ seeding, streamed in chunks over features of any number of rows.

Used for VQGAN-LC codebooks (``fullvq init-codebook`` clusters vision-encoder patch features); the
assignment step is the quantizers' exact chunked ``nearest_code`` search, so memory stays at
K x D centres plus one chunk whatever the number of features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .quantizers.base import nearest_code

INITS = ("k-means++", "random")
# k-means++ seeds from at most this many features (it costs one pass over them per centre).
MAX_INIT_SAMPLE = 2**20
INIT_SAMPLES_PER_CENTRE = 32
# Farthest points remembered per k-means pass as candidates to re-seed empty clusters.
RESEED_POOL = 4096


@dataclass
class KMeansResult:
    """centers: (K, D) float32 on CPU; cluster_sizes: (K,) features per centre (final assignment);
    inertia: sum of squared distances to the nearest centre; inertia_history: inertia before each
    update and after the last; num_reseeded: empty clusters moved during the run."""

    centers: torch.Tensor
    cluster_sizes: torch.Tensor
    inertia: float
    inertia_history: list[float] = field(default_factory=list)
    num_iterations: int = 0
    num_reseeded: int = 0


def _chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def _kmeans_plus_plus(sample: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    num_rows = sample.shape[0]
    # All random numbers come from the CPU generator up front: same seeds on CPU and GPU, no syncs.
    draws = torch.rand(num_clusters, generator=generator, dtype=torch.float64).to(sample.device)
    fallback = torch.randint(num_rows, (num_clusters,), generator=generator).to(sample.device)
    centers = torch.empty(num_clusters, sample.shape[1], dtype=sample.dtype, device=sample.device)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product, no (S, D) temporary.
    sample_sq = sample.pow(2).sum(dim=1)

    def sq_distance(center: torch.Tensor) -> torch.Tensor:
        return (sample_sq - 2 * (sample @ center) + center.dot(center)).clamp_(min=0)

    centers[0] = sample[fallback[0]]
    min_sq = sq_distance(centers[0])
    for k in range(1, num_clusters):
        cumulative = min_sq.double().cumsum(0)
        total = cumulative[-1]
        pick = torch.searchsorted(cumulative, (draws[k] * total).unsqueeze(0)).clamp_(max=num_rows - 1)[0]
        # Every remaining point coincides with a centre: any point will do.
        pick = torch.where(total > 0, pick, fallback[k])
        centers[k] = sample[pick]
        torch.minimum(min_sq, sq_distance(centers[k]), out=min_sq)
    return centers


def _assign(features: torch.Tensor, centers: torch.Tensor, chunk_size: int):
    """One pass: every feature to its nearest centre. Returns the per-centre sums (float64) and sizes,
    the inertia, and the rows of the (up to ``RESEED_POOL``) farthest features, farthest first:
    candidates to re-seed empty clusters."""
    num_clusters, dim = centers.shape
    device = centers.device
    sums = torch.zeros(num_clusters, dim, dtype=torch.float64, device=device)
    sizes = torch.zeros(num_clusters, dtype=torch.long, device=device)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    far_sq = torch.empty(0, device=device)
    far_rows = torch.empty(0, dtype=torch.long, device=device)
    for rows in _chunks(features.shape[0], chunk_size):
        chunk = features[rows].to(device, torch.float32, non_blocking=True)
        assigned = nearest_code(chunk, centers)
        sq = (chunk - centers[assigned]).pow(2).sum(dim=1)
        inertia += sq.double().sum()
        sums.index_add_(0, assigned, chunk.double())
        sizes += torch.bincount(assigned, minlength=num_clusters)
        # Keep the globally farthest points: candidates for empty clusters.
        far_sq = torch.cat([far_sq, sq])
        far_rows = torch.cat([far_rows, torch.arange(rows.start, rows.stop, device=device)])
        if far_sq.numel() > RESEED_POOL:
            far_sq, keep = far_sq.topk(RESEED_POOL)
            far_rows = far_rows[keep]
    return sums, sizes, float(inertia), far_rows[far_sq.argsort(descending=True)]


# About 90 lines, a third of them docstring: Lloyd's loop (assign, update, re-seed) reads best whole.
@torch.no_grad()
def kmeans(
    features: torch.Tensor,
    num_clusters: int,
    *,
    num_iters: int = 20,
    tol: float = 1e-4,
    init: str = "k-means++",
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk_size: int = 16384,
    init_sample_size: int | None = None,
    progress: bool = True,
    desc: str = "k-means",
) -> KMeansResult:
    """Lloyd's k-means over ``features`` (M, D), streamed in chunks.

    Args:
        features: (M, D) float tensor; may live on CPU (also memory-mapped) while ``device`` is a
            GPU: only one ``chunk_size`` slice is moved at a time.
        num_clusters: K, at most M.
        num_iters: at most this many centre updates.
        tol: stop early when inertia falls by at most this fraction in one update (0: only at a
            fixed point).
        init: ``"k-means++"`` (on a sample of ``init_sample_size`` rows, default min(M, 32 K, 2^20))
            or ``"random"`` (K distinct rows).
        seed: all randomness comes from a CPU generator seeded with it (bitwise repeatable on CPU;
            on GPU up to the float rounding of atomic sums).
        device: where centres live and distances are computed (default: ``features.device``).

    Returns:
        ``KMeansResult``. Assignment uses the exact chunked ``nearest_code`` search, so memory is
        K x D centres and sums plus one chunk, whatever M is. Empty clusters are re-seeded at the
        points farthest from their centres, which never raises the inertia.
    """
    if features.ndim != 2:
        raise ValueError(f"k-means needs features of shape (M, D), got {tuple(features.shape)}")
    num_rows, dim = features.shape
    if not 1 <= num_clusters <= num_rows:
        raise ValueError(
            f"cannot make {num_clusters} clusters from {num_rows} features; lower the number of "
            f"clusters to at most {num_rows} or extract more features (more images, less pooling)"
        )
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; choose one of: {', '.join(INITS)}")
    device = torch.device(device) if device is not None else features.device
    generator = torch.Generator().manual_seed(seed)

    if init == "random":
        rows = torch.randperm(num_rows, generator=generator)[:num_clusters].sort().values
        centers = features[rows].to(device, torch.float32)
    else:
        sample_size = init_sample_size or min(num_rows, max(num_clusters * INIT_SAMPLES_PER_CENTRE, 1), MAX_INIT_SAMPLE)
        sample_size = max(min(sample_size, num_rows), num_clusters)
        rows = torch.randperm(num_rows, generator=generator)[:sample_size].sort().values
        sample = (features[rows] if sample_size < num_rows else features).to(device, torch.float32)
        centers = _kmeans_plus_plus(sample, num_clusters, generator)
        del sample

    history: list[float] = []
    num_reseeded = 0
    bar = tqdm(total=num_iters, desc=desc, disable=not progress, leave=progress, unit="iter")
    for iteration in range(num_iters + 1):
        sums, sizes, inertia, far_rows = _assign(features, centers, chunk_size)
        history.append(inertia)
        bar.set_postfix(inertia=f"{history[-1]:.4g}")
        converged = len(history) > 1 and history[-2] - history[-1] <= tol * abs(history[-2])
        if iteration == num_iters or converged:
            break

        # Update: centre = mean of its features; empty ones move to the farthest points.
        filled = sizes > 0
        centers[filled] = (sums[filled] / sizes[filled].unsqueeze(1)).float()
        empty = (~filled).nonzero().squeeze(1)
        if empty.numel():
            num_reseeded += empty.numel()
            new_rows = far_rows[: empty.numel()]
            if new_rows.numel() < empty.numel():
                extra = torch.randint(num_rows, (empty.numel() - new_rows.numel(),), generator=generator)
                new_rows = torch.cat([new_rows, extra.to(device)])
            centers[empty] = features[new_rows.cpu()].to(device, torch.float32)
        bar.update(1)
    bar.close()
    return KMeansResult(
        centers=centers.float().cpu(),
        cluster_sizes=sizes.cpu(),
        inertia=history[-1],
        inertia_history=history,
        num_iterations=len(history) - 1,
        num_reseeded=num_reseeded,
    )


__all__ = ["INITS", "KMeansResult", "kmeans"]
