"""VQGAN-LC codebook: k-means centres of a pretrained vision encoder's patch features.

``fullvq init-codebook --encoder NAME_OR_PATH --data DIR --num-codes N --out codebook.safetensors``
loads any ``transformers`` ViT-style backbone (CLIP vision, DINOv2, SigLIP, ViT) with
``AutoModel.from_pretrained``, takes its patch tokens (class and register tokens dropped), and
clusters them to N centres, globally or per class (VQGAN-LC's recipe: 100 centres for each of
ImageNet's 1,000 classes, on patch features average-pooled 4x per side). The file holds one
float32 ``codebook`` tensor (N x feature_dim) that ``LCQuantizer.load_codebook`` reads.

Feature space: by default the last hidden state (the encoder width, before any projection head).
VQGAN-LC's own scripts cluster 768-d patch tokens of ViT-L/14 (width 1024), i.e. CLIP's projected
space; pass ``feature_space="projected"`` (``--feature-space projected``) with a full CLIP checkpoint
for that.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .quantizers.base import nearest_code

INITS = ("k-means++", "random")
FEATURE_SPACES = ("hidden", "projected")
# k-means++ seeds from at most this many features (it costs one pass over them per centre).
MAX_INIT_SAMPLE = 2**20
INIT_SAMPLES_PER_CENTRE = 32
# Farthest points remembered per k-means pass as candidates to re-seed empty clusters.
RESEED_POOL = 4096


# --------------------------------------------------------------------------------------------
# k-means


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
        # One pass: assign every feature to its nearest centre, accumulate sums, sizes and inertia.
        sums = torch.zeros(num_clusters, dim, dtype=torch.float64, device=device)
        sizes = torch.zeros(num_clusters, dtype=torch.long, device=device)
        inertia = torch.zeros((), dtype=torch.float64, device=device)
        far_sq = torch.empty(0, device=device)
        far_rows = torch.empty(0, dtype=torch.long, device=device)
        for rows in _chunks(num_rows, chunk_size):
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
        history.append(float(inertia))
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
            order = far_sq.argsort(descending=True)[: empty.numel()]
            new_rows = far_rows[order]
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


# --------------------------------------------------------------------------------------------
# Vision encoder -> patch features


def _image_statistics(processor, config) -> tuple[list[float], list[float]]:
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        IMAGENET_STANDARD_MEAN,
        IMAGENET_STANDARD_STD,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
    )

    if processor is not None and getattr(processor, "image_mean", None) is not None:
        return list(processor.image_mean), list(processor.image_std)
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("clip"):
        return list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    if model_type.startswith("siglip"):
        return list(IMAGENET_STANDARD_MEAN), list(IMAGENET_STANDARD_STD)
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def _processor_image_size(processor) -> int | None:
    if processor is None:
        return None
    for name in ("crop_size", "size"):
        size = getattr(processor, name, None)
        if size is None:
            continue
        size = dict(size) if not isinstance(size, int) else {"height": size}
        for key in ("height", "shortest_edge"):
            if size.get(key):
                return int(size[key])
    return None


class PatchFeatureExtractor(nn.Module):
    """A pretrained ViT-style encoder reduced to its patch-token grid.

    Call it with images in [-1, 1], shape (B, 3, R, R) with R = ``image_size``; it applies the
    encoder's own normalisation and returns (B, g, g, feature_dim) float32 patch features,
    g = R // patch_size, with the leading class / register tokens removed.
    """

    def __init__(self, vision_model: nn.Module, *, image_size: int, patch_size: int, hidden_size: int,
                 mean: Sequence[float], std: Sequence[float], model_type: str = "",
                 projection: nn.Module | None = None, interpolate_pos_encoding: bool = False):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection
        self.image_size = image_size
        self.patch_size = patch_size
        self.model_type = model_type
        self.grid_size = image_size // patch_size
        self.feature_dim = hidden_size if projection is None else projection[-1].out_features
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        accepts = inspect.signature(vision_model.forward).parameters
        self._forward_kwargs = {"interpolate_pos_encoding": True} if (
            interpolate_pos_encoding and "interpolate_pos_encoding" in accepts) else {}
        self.num_prefix_tokens = self._count_prefix_tokens()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, image_size: int | None = None,
                        feature_space: str = "hidden", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "PatchFeatureExtractor":
        """Load a vision backbone with ``AutoModel.from_pretrained`` (a hub id or a local folder).

        Normalisation comes from the folder's image processor when it has one, else CLIP / SigLIP /
        ImageNet statistics by model type; the input size from the processor's crop size, else the
        config's ``image_size`` (``image_size`` overrides both).
        """
        from transformers import AutoImageProcessor, AutoModel

        name = os.fspath(name_or_path)
        if feature_space not in FEATURE_SPACES:
            raise ValueError(f"unknown feature_space {feature_space!r}; choose one of: {', '.join(FEATURE_SPACES)}")
        looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
        if looks_local and not os.path.exists(os.path.expanduser(name)):
            raise FileNotFoundError(
                f"vision encoder folder {name!r} does not exist; pass a local model folder or a hub id")
        try:
            model = AutoModel.from_pretrained(os.path.expanduser(name), dtype=dtype)
        except Exception as error:
            raise ValueError(
                f"could not load vision encoder {name!r} with transformers.AutoModel.from_pretrained "
                f"({type(error).__name__}: {error}); pass a CLIP, DINOv2, SigLIP or ViT checkpoint folder or hub id"
            ) from error
        try:
            processor = AutoImageProcessor.from_pretrained(os.path.expanduser(name))
        except Exception:  # no preprocessor_config.json: fall back to the model type's statistics
            processor = None

        config = getattr(model.config, "vision_config", None) or model.config
        # Two-tower models (CLIPModel, SiglipModel) keep the image tower in .vision_model.
        vision_model = model.vision_model if getattr(model, "vision_model", None) is not None else model
        patch_size = getattr(config, "patch_size", None)
        hidden_size = getattr(config, "hidden_size", None)
        if not isinstance(patch_size, int) or not hidden_size:
            raise ValueError(
                f"encoder {name!r} (model_type {getattr(config, 'model_type', '?')!r}) has no patch tokens; "
                f"init-codebook needs a ViT-style vision backbone with a patch_size, e.g. CLIP vision, "
                f"DINOv2, SigLIP or ViT"
            )
        native_size = int(getattr(config, "image_size", 0) or 0)
        size = int(image_size or _processor_image_size(processor) or native_size or 224)
        if size < patch_size:
            raise ValueError(f"image_size={size} is smaller than the encoder's patch_size={patch_size}")

        projection = None
        if feature_space == "projected":
            head = getattr(model, "visual_projection", None)
            norm = getattr(vision_model, "post_layernorm", None)
            if head is None or norm is None:
                raise ValueError(
                    f"encoder {name!r} has no visual projection head; use feature_space='hidden' or a "
                    f"full CLIP checkpoint (CLIPModel / CLIPVisionModelWithProjection)"
                )
            projection = nn.Sequential(norm, head)
        mean, std = _image_statistics(processor, config)
        extractor = cls(vision_model, image_size=size, patch_size=patch_size, hidden_size=int(hidden_size),
                        mean=mean, std=std, model_type=getattr(config, "model_type", ""),
                        projection=projection, interpolate_pos_encoding=size != native_size)
        return extractor.to(device).eval()

    def _count_prefix_tokens(self) -> int:
        """Leading non-patch tokens (class, registers), read off one forward pass of the real model."""
        probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.mean.device)
        with torch.no_grad():
            hidden = self._hidden_states(probe)
        if hidden.ndim != 3:
            raise ValueError(
                f"encoder ({self.model_type or type(self.vision_model).__name__}) returns a "
                f"{hidden.ndim}-d last_hidden_state, not (batch, tokens, width): it has no patch tokens"
            )
        prefix = hidden.shape[1] - self.grid_size**2
        if prefix < 0:
            raise ValueError(
                f"encoder returned {hidden.shape[1]} tokens for a {self.grid_size} x {self.grid_size} patch "
                f"grid; it has no patch tokens at image_size={self.image_size}"
            )
        return prefix

    def _hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parameter = next(self.vision_model.parameters())
        normalized = ((pixel_values + 1) / 2 - self.mean) / self.std
        output = self.vision_model(pixel_values=normalized.to(parameter.dtype), **self._forward_kwargs)
        return output.last_hidden_state

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden_states(pixel_values)[:, self.num_prefix_tokens :]
        if self.projection is not None:
            hidden = self.projection(hidden)
        return hidden.float().reshape(hidden.shape[0], self.grid_size, self.grid_size, -1)


def pool_patches(features: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """Average-pool a (B, g, g, D) patch grid ``pool_factor`` x per side (VQGAN-LC uses 4: 16 -> 4)."""
    if pool_factor == 1:
        return features
    grid = features.shape[1]
    out = max(1, grid // pool_factor)
    pooled = F.adaptive_avg_pool2d(features.permute(0, 3, 1, 2), out)
    return pooled.permute(0, 2, 3, 1)


def tokens_per_image(extractor: PatchFeatureExtractor, pool_factor: int) -> int:
    """Features one image gives after pooling."""
    return max(1, extractor.grid_size // pool_factor) ** 2


class _IndexedImages(torch.utils.data.Dataset):
    """``dataset[indices[i]]`` as ``(i, item)``; item is None for an unreadable file (no stand-in image)."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        load = getattr(self.dataset, "load", None)
        index = self.indices[position]
        return position, (load(index, substitute=False) if load is not None else self.dataset[index])


def _collate_readable(batch):
    kept = [(position, item) for position, item in batch if item is not None]
    positions = torch.tensor([position for position, _ in kept], dtype=torch.long)
    pixels = torch.stack([item["pixel_values"] for _, item in kept]) if kept else None
    return positions, pixels, len(batch)


def iter_features(
    extractor: PatchFeatureExtractor,
    dataset: torch.utils.data.Dataset,
    indices: Sequence[int],
    *,
    pool_factor: int = 1,
    features_per_image: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    skipped: list[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(positions, features)`` per batch: the positions in ``indices`` of the readable images
    and their (B, T, D) float32 CPU features, T = pooled grid tokens or a random ``features_per_image``
    of them per image (seeded). Positions of unreadable images are appended to ``skipped``.
    """
    device = extractor.mean.device
    generator = torch.Generator().manual_seed(seed)
    images = _IndexedImages(dataset, indices)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate_readable)
    first = 0  # position of the batch's first image
    with tqdm(total=len(images), desc="patch features", unit="img", disable=not progress, leave=progress) as bar:
        for positions, pixels, size in loader:
            bar.update(size)
            if skipped is not None and len(positions) < size:
                readable = set(positions.tolist())
                skipped.extend(p for p in range(first, first + size) if p not in readable)
            first += size
            if pixels is None:
                continue
            features = pool_patches(extractor(pixels.to(device)), pool_factor).flatten(1, 2).cpu()
            if features_per_image is not None and features_per_image < features.shape[1]:
                keep = torch.rand(features.shape[:2], generator=generator).argsort(dim=1)[:, :features_per_image]
                features = torch.gather(features, 1, keep.unsqueeze(-1).expand(-1, -1, features.shape[2]))
            yield positions, features


def extract_features(
    extractor: PatchFeatureExtractor,
    dataset: torch.utils.data.Dataset,
    indices: Sequence[int] | None = None,
    *,
    pool_factor: int = 1,
    features_per_image: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    skipped: list[int] | None = None,
) -> torch.Tensor:
    """(M, D) float32 patch features of the readable images among ``dataset[indices]`` (default: all).

    With ``cache_path`` (a ``.npy`` file) the features are written to a memory-mapped array on disk
    and the returned tensor reads from it, so tens of millions of features need no RAM.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    per_image = tokens_per_image(extractor, pool_factor)
    if features_per_image is not None:
        per_image = min(per_image, features_per_image)
    shape = (len(indices) * per_image, extractor.feature_dim)
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        storage = torch.from_numpy(np.lib.format.open_memmap(os.fspath(cache_path), mode="w+",
                                                             dtype=np.float32, shape=shape))
    else:
        storage = torch.empty(shape, dtype=torch.float32)
    filled = 0
    for _, features in iter_features(extractor, dataset, indices, pool_factor=pool_factor,
                                     features_per_image=features_per_image, batch_size=batch_size,
                                     num_workers=num_workers, seed=seed, progress=progress, skipped=skipped):
        rows = features.flatten(0, 1)
        storage[filled : filled + len(rows)] = rows
        filled += len(rows)
    return storage[:filled]  # unreadable images leave their rows unused


# --------------------------------------------------------------------------------------------
# The whole job


def split_codes(num_codes: int, num_classes: int) -> list[int]:
    """Codes per class for per-class clustering: as even as possible, the first classes get the rest."""
    base, extra = divmod(num_codes, num_classes)
    return [base + (i < extra) for i in range(num_classes)]


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _size_histogram(sizes: torch.Tensor, bins: int = 20) -> dict:
    values = sizes.double().numpy()
    counts, edges = np.histogram(values, bins=bins)
    return {
        "min": int(values.min()), "max": int(values.max()), "mean": float(values.mean()),
        "median": float(np.median(values)), "empty_clusters": int((values == 0).sum()),
        "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
    }


def _plot_stats(path: Path, sizes: torch.Tensor, curve: list[float], curve_label: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.hist(sizes.numpy(), bins=min(50, max(5, len(sizes) // 4)), color="tab:blue")
    left.set_xlabel("features per code (cluster size)")
    left.set_ylabel("codes")
    left.set_title("cluster sizes")
    right.plot(range(len(curve)), curve, marker="o" if len(curve) < 40 else None, color="tab:orange")
    right.set_xlabel(curve_label)
    right.set_ylabel("inertia per feature")
    right.set_title("k-means inertia")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_codebook(codebook: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``{"codebook": float32 (N, D)}`` as safetensors (string metadata alongside)."""
    from safetensors.torch import save_file

    save_file({"codebook": codebook.float().contiguous()}, os.fspath(path),
              metadata={key: str(value) for key, value in (metadata or {}).items()})


def stats_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON and PNG written beside a codebook file: ``<stem>_stats.json``, ``<stem>_cluster_sizes.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_stats.json"), out.with_name(f"{out.stem}_cluster_sizes.png")


def init_codebook(
    encoder: str | os.PathLike,
    data: str | os.PathLike,
    num_codes: int,
    out: str | os.PathLike,
    *,
    per_class: bool = False,
    overwrite: bool = False,
    split: str = "train",
    image_size: int | None = None,
    feature_space: str = "hidden",
    pool_factor: int = 1,
    features_per_image: int | None = None,
    max_images: int | None = None,
    num_iters: int = 20,
    tol: float = 1e-4,
    init: str = "k-means++",
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int = 16384,
    feature_cache: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Build a VQGAN-LC codebook file from ``data`` with ``encoder`` and return its statistics.

    Global mode clusters all (optionally subsampled) patch features to ``num_codes`` centres;
    ``per_class`` clusters each class separately (``num_codes`` split evenly over the classes,
    ``max_images`` then counts per class) and concatenates the centres in class order, holding
    one class's features at a time. Writes ``out`` (safetensors, key ``codebook``), and beside it
    ``<stem>_stats.json`` and ``<stem>_cluster_sizes.png``.
    """
    from ..data import build_dataset
    from .quantizers.projected import LCQuantizer

    started = time.time()
    out = Path(out).expanduser()
    _check_positive("num_codes", num_codes)
    _check_positive("pool_factor", pool_factor)
    _check_positive("features_per_image", features_per_image, allow_none=True)
    _check_positive("max_images", max_images, allow_none=True)
    _check_positive("num_iters", num_iters)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r} must end in .safetensors (the lc quantizer reads that format)")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it or choose another --out")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    extractor = PatchFeatureExtractor.from_pretrained(encoder, image_size=image_size, feature_space=feature_space,
                                                      device=device, dtype=dtype)
    dataset = build_dataset(data, resolution=extractor.image_size, train=False, split=split,
                            require_labels=per_class, image_column=image_column, label_column=label_column,
                            cache_dir=cache_dir)
    per_image = tokens_per_image(extractor, pool_factor)
    if features_per_image is not None:
        per_image = min(per_image, features_per_image)
    generator = torch.Generator().manual_seed(seed)

    def subsample(indices: list[int]) -> list[int]:
        if max_images is None or len(indices) <= max_images:
            return indices
        pick = torch.randperm(len(indices), generator=generator)[:max_images].sort().values
        return [indices[i] for i in pick.tolist()]

    skipped: list[int] = []
    extract = dict(pool_factor=pool_factor, features_per_image=features_per_image, batch_size=batch_size,
                   num_workers=num_workers, seed=seed, progress=progress, skipped=skipped)
    cluster = dict(num_iters=num_iters, tol=tol, init=init, device=device, chunk_size=chunk_size)
    too_few = "; lower --num-codes, add images, or lower --pool-factor / raise --features-per-image"
    if not per_class:
        indices = subsample(list(range(len(dataset))))
        if num_codes > len(indices) * per_image:  # checked before the slow part
            raise ValueError(f"num_codes={num_codes} is larger than the {len(indices) * per_image} features "
                             f"that {len(indices)} images give ({per_image} each){too_few}")
        features = extract_features(extractor, dataset, indices, cache_path=feature_cache, **extract)
        if num_codes > len(features):
            raise ValueError(f"num_codes={num_codes} is larger than the {len(features)} features of the "
                             f"{len(indices) - len(skipped)} readable images{too_few}")
        result = kmeans(features, num_codes, seed=seed, progress=progress, **cluster)
        centers, sizes, inertia = result.centers, result.cluster_sizes, result.inertia
        num_features, num_images = len(features), len(indices) - len(skipped)
        curve = [value / num_features for value in result.inertia_history]
        curve_label = "iteration"
        details = {"inertia_history": result.inertia_history, "iterations": result.num_iterations,
                   "reseeded_clusters": result.num_reseeded}
    else:
        labels = dataset.labels()
        classes = sorted({label for label in labels if label >= 0})
        if num_codes < len(classes):
            raise ValueError(
                f"num_codes={num_codes} is smaller than the {len(classes)} classes; per-class clustering "
                f"needs at least one code per class: raise --num-codes or drop --per-class"
            )
        by_class: dict[int, list[int]] = {label: [] for label in classes}
        for index, label in enumerate(labels):
            if label >= 0:
                by_class[label].append(index)
        by_class = {label: subsample(members) for label, members in by_class.items()}
        quota = dict(zip(classes, split_codes(num_codes, len(classes))))
        name = lambda label: dataset.id2label.get(label, str(label))  # noqa: E731
        for label in classes:
            if quota[label] > len(by_class[label]) * per_image:
                raise ValueError(f"class {name(label)!r} has {len(by_class[label]) * per_image} features "
                                 f"({len(by_class[label])} images), fewer than its {quota[label]} codes{too_few}")

        # One pass over the images sorted by class; a class is clustered as soon as it is complete,
        # so only one class's features are held at a time.
        order = [index for label in classes for index in by_class[label]]
        owner = [label for label in classes for _ in by_class[label]]
        pending: list[torch.Tensor] = []
        results: dict[int, KMeansResult] = {}

        def finish(label: int) -> None:
            class_features = torch.cat(pending) if pending else torch.empty(0, extractor.feature_dim)
            pending.clear()
            if quota[label] > len(class_features):
                raise ValueError(f"class {name(label)!r} has {len(class_features)} features of readable images, "
                                 f"fewer than its {quota[label]} codes{too_few}")
            results[label] = kmeans(class_features, quota[label], seed=seed + label, progress=progress,
                                    desc=f"k-means {name(label)}", **cluster)

        current = 0  # index into classes of the class being gathered
        for positions, features in iter_features(extractor, dataset, order, **extract):
            for position, rows in zip(positions.tolist(), features):
                while owner[position] != classes[current]:
                    finish(classes[current])
                    current += 1
                pending.append(rows)
        while current < len(classes):
            finish(classes[current])
            current += 1
        centers = torch.cat([results[label].centers for label in classes])
        sizes = torch.cat([results[label].cluster_sizes for label in classes])
        inertia = sum(results[label].inertia for label in classes)
        num_features = int(sizes.sum())
        num_images = len(order) - len(skipped)
        curve = [results[label].inertia / max(1, int(results[label].cluster_sizes.sum())) for label in classes]
        curve_label = "class id"
        details = {
            "codes_per_class": {name(label): quota[label] for label in classes},
            "inertia_per_class": {name(label): results[label].inertia for label in classes},
            "reseeded_clusters": sum(results[label].num_reseeded for label in classes),
        }

    metadata = {"encoder": os.fspath(encoder), "feature_dim": centers.shape[1], "num_codes": centers.shape[0],
                "clustering": "per-class" if per_class else "global", "feature_space": feature_space,
                "pool_factor": pool_factor, "image_size": extractor.image_size}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_codebook(centers, out, metadata)
    # The point of the file: it must load into the lc quantizer as is (shape and dtype checked there).
    LCQuantizer(centers.shape[0], 1, feature_dim=centers.shape[1]).load_codebook(out)

    stats_json, stats_png = stats_paths(out)
    stats = {
        **metadata,
        "data": os.fspath(data),
        "split": split,
        "codebook": str(out),
        "images": num_images,
        "features": num_features,
        "skipped_images": len(skipped),
        "init": init, "num_iters": num_iters, "tol": tol, "seed": seed, "device": str(device),
        "inertia": inertia,
        "inertia_per_feature": inertia / max(1, num_features),
        "cluster_sizes": _size_histogram(sizes),
        **details,
        "seconds": round(time.time() - started, 3),
        "stats_png": str(stats_png),
    }
    stats_json.write_text(json.dumps(stats, indent=2) + "\n")
    _plot_stats(stats_png, sizes, curve, curve_label,
                f"{centers.shape[0]} codes x {centers.shape[1]} from {os.path.basename(os.fspath(encoder))} "
                f"({'per class' if per_class else 'global'})")
    return stats


# --------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="k-means codebook for the lc quantizer (VQGAN-LC) from a pretrained vision encoder's "
                    "patch features. VQGAN-LC recipe: --encoder openai/clip-vit-large-patch14 --per-class "
                    "--num-codes 100000 --pool-factor 4 on ImageNet train.",
    )
    parser.add_argument("--encoder", required=True, help="transformers vision backbone: hub id or local folder "
                        "(CLIP vision, DINOv2, SigLIP, ViT)")
    parser.add_argument("--data", required=True,
                        help="image folder (one sub-folder per class), hub dataset name or 'demo'")
    parser.add_argument("--num-codes", type=int, required=True, help="codebook size N")
    parser.add_argument("--out", required=True, help="output .safetensors file (key 'codebook', float32 N x D)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--per-class", action="store_true", help="cluster each class separately (N split over classes)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="encoder input size (default: its processor / config)")
    parser.add_argument("--feature-space", choices=FEATURE_SPACES, default="hidden",
                        help="hidden: last hidden state (default); projected: CLIP's projection head")
    parser.add_argument("--pool-factor", type=int, default=1,
                        help="average-pool the patch grid this much per side (VQGAN-LC: 4)")
    parser.add_argument("--features-per-image", type=int, default=None, help="random patch features kept per image")
    parser.add_argument("--max-images", type=int, default=None, help="random images used (per class with --per-class)")
    parser.add_argument("--iters", type=int, default=20, help="maximum k-means updates (default: 20)")
    parser.add_argument("--tol", type=float, default=1e-4, help="stop when inertia falls by less than this fraction")
    parser.add_argument("--init", choices=INITS, default="k-means++", help="centre initialisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="encoder weights dtype (k-means always runs in float32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--chunk-size", type=int, default=16384, help="features per k-means assignment chunk")
    parser.add_argument("--feature-cache", default=None,
                        help="global mode: keep features in this .npy memory map, not RAM")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder (default: its own)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str], prog: str = "fullvq init-codebook") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        stats = init_codebook(
            args.encoder, args.data, args.num_codes, args.out, per_class=args.per_class, overwrite=args.overwrite,
            split=args.split, image_size=args.image_size, feature_space=args.feature_space,
            pool_factor=args.pool_factor, features_per_image=args.features_per_image, max_images=args.max_images,
            num_iters=args.iters, tol=args.tol, init=args.init, seed=args.seed, device=args.device,
            dtype=getattr(torch, args.dtype), batch_size=args.batch_size, num_workers=args.num_workers,
            chunk_size=args.chunk_size, feature_cache=args.feature_cache, image_column=args.image_column,
            label_column=args.label_column, cache_dir=args.cache_dir, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    sizes = stats["cluster_sizes"]
    print(
        f"wrote {stats['codebook']}: {stats['num_codes']} codes x {stats['feature_dim']} from {stats['features']} "
        f"features of {stats['images']} images; inertia/feature {stats['inertia_per_feature']:.4g}, "
        f"empty clusters {sizes['empty_clusters']}; stats in {stats_paths(stats['codebook'])[0]}\n"
        f"use it with build_quantizer('lc', codebook_size={stats['num_codes']}, "
        f"feature_dim={stats['feature_dim']}, ...).load_codebook({stats['codebook']!r})"
    )
    return 0


__all__ = [
    "KMeansResult",
    "kmeans",
    "PatchFeatureExtractor",
    "pool_patches",
    "iter_features",
    "extract_features",
    "split_codes",
    "save_codebook",
    "stats_paths",
    "init_codebook",
    "main",
]
