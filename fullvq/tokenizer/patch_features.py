"""Patch features of a pretrained vision encoder (CLIP vision, DINOv2, SigLIP, ViT): what VQGAN-LC
clusters into its frozen codebook.

``PatchFeatureExtractor.from_pretrained`` loads any ``transformers`` ViT-style backbone with
``AutoModel.from_pretrained`` and reduces it to its patch-token grid (class and register tokens
dropped), with the encoder's own input normalisation. By default the features are the last hidden
state (the encoder width, before any projection head); VQGAN-LC's own scripts cluster 768-d patch
tokens of ViT-L/14 (width 1024), i.e. CLIP's projected space: ``feature_space="projected"`` with a
full CLIP checkpoint gives that.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io import local_folder_or_hub_id

FEATURE_SPACES = ("hidden", "projected")


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
                        dtype: torch.dtype = torch.float32) -> PatchFeatureExtractor:
        """Load a vision backbone with ``AutoModel.from_pretrained`` (a hub id or a local folder).

        Normalisation comes from the folder's image processor when it has one, else CLIP / SigLIP /
        ImageNet statistics by model type; the input size from the processor's crop size, else the
        config's ``image_size`` (``image_size`` overrides both).
        """
        from transformers import AutoImageProcessor, AutoModel

        name = os.fspath(name_or_path)
        if feature_space not in FEATURE_SPACES:
            raise ValueError(f"unknown feature_space {feature_space!r}; choose one of: {', '.join(FEATURE_SPACES)}")
        name = local_folder_or_hub_id(name, "vision encoder")
        try:
            model = AutoModel.from_pretrained(name, dtype=dtype)
        except Exception as error:
            raise ValueError(
                f"could not load vision encoder {name!r} with transformers.AutoModel.from_pretrained "
                f"({type(error).__name__}: {error}); pass a CLIP, DINOv2, SigLIP or ViT checkpoint folder or hub id"
            ) from error
        try:
            processor = AutoImageProcessor.from_pretrained(name)
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


def extract_patch_features(
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



__all__ = [
    "FEATURE_SPACES",
    "PatchFeatureExtractor",
    "pool_patches",
    "tokens_per_image",
    "iter_features",
    "extract_patch_features",
]
