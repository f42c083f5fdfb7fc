"""Reference statistics for FID: Inception mean / covariance (and features) of a reference set.

Reference sets (``load_reference``) are an image folder, a dataset (``fullvq.data.build_dataset``)
or a ``.npz`` of Inception statistics (``mu``/``sigma``, as the ADM evaluation suite ships, or a
file written by ``ReferenceStatistics.save``). Statistics computed from images are cached under a
key made of the images' content, the preprocessing and the Inception weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fullvq.distributed import process_state
from fullvq.io import atomic_file, sha256_files

from ..data import IMAGE_EXTENSIONS, build_dataset
from .features import InceptionExtractor, extract_features
from .image_sets import ImageFiles, Uint8Images, npz_images
from .inception import FEATURE_DIM

STATISTICS_FORMAT = 1
CACHE_DIR_ENV = "FULLVQ_CACHE_DIR"


@dataclass
class ReferenceStatistics:
    """Inception statistics of a reference set.

    mu, sigma: pool3 mean (2048,) and covariance (2048, 2048), float64 (what FID needs).
    features: pool3 features (N, 2048) when known (KID and precision/recall need them), else None.
    num_images: images the statistics come from (None when a file does not say).
    info: where they come from (source, weights, cache key); saved with them.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None = None
    num_images: int | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: torch.Tensor, info: dict | None = None) -> ReferenceStatistics:
        from torch_fidelity.metric_fid import fid_features_to_statistics

        if len(features) < 2:
            raise ValueError(f"Inception statistics need at least 2 images, got {len(features)}")
        stats = fid_features_to_statistics(features.double())
        return cls(stats["mu"], stats["sigma"], features.float(), len(features), dict(info or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.npz`` with ``mu``, ``sigma``, ``features`` (when known) and this tool's metadata."""
        path = Path(path)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["features"] = self.features.numpy().astype(np.float32)
        meta = {"format": STATISTICS_FORMAT, "num_images": self.num_images, **self.info}
        with atomic_file(path) as staging:
            with open(staging, "wb") as file:  # a file object: np.savez would append .npz to a name
                np.savez(file, fullvq=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStatistics:
        """Read a ``.npz`` with ``mu`` and ``sigma`` (ADM reference batch or a file written by ``save``).

        ``features`` are read when the file has them; ADM's ``arr_0`` images are left to
        ``load_reference``, which computes their features.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path} as a .npz file: {error}") from None
        with data:
            keys = sorted(data.files)
            if "mu" not in keys or "sigma" not in keys:
                raise ValueError(
                    f"reference {path} has no Inception statistics: it holds {keys} but needs 'mu' and 'sigma'; "
                    "pass an ADM reference batch, a file from `fullvq eval reference-stats`, or the images instead"
                )
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
            if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
                raise ValueError(
                    f"reference {path}: mu {mu.shape} / sigma {sigma.shape} are not InceptionV3 pool3 statistics "
                    f"((2048,) and (2048, 2048))"
                )
            features = torch.from_numpy(data["features"].astype(np.float32)) if "features" in keys else None
            info = json.loads(str(data["fullvq"])) if "fullvq" in keys else {}
        num_images = info.pop("num_images", None) or (len(features) if features is not None else None)
        info.pop("format", None)
        return cls(mu, sigma, features, num_images, {**info, "file": str(path)})


def default_cache_dir() -> Path:
    """``$FULLVQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/fullvq`` (``~/.cache/fullvq``), + ``/inception``."""
    root = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "fullvq"
    return Path(root).expanduser() / "inception"


def _image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _is_plain_image_folder(path: Path) -> bool:
    # A folder written by datasets' save_to_disk also holds files; only loose images count here.
    return path.is_dir() and not (path / "state.json").exists() and not (path / "dataset_dict.json").exists() \
        and bool(_image_paths(path))


def reference_kind(reference) -> str:
    """``"statistics"`` (an object or a .npz), ``"folder"`` (loose image files) or ``"dataset"``."""
    if isinstance(reference, ReferenceStatistics):
        return "statistics"
    path = Path(os.fspath(reference)).expanduser()
    if path.suffix == ".npz":
        return "statistics"
    return "folder" if _is_plain_image_folder(path) else "dataset"


def _dataset_digest(source: str, dataset) -> str:
    """Content digest of a build_dataset source: file bytes for local data, the digits for 'demo',
    the ``datasets`` fingerprint (revision + config) for a hub dataset."""
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return sha256_files(files, path if path.is_dir() else path.parent)
    if source == "demo":
        return hashlib.sha256(dataset.images.numpy().tobytes()).hexdigest()
    fingerprint = getattr(getattr(dataset, "table", None), "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(f"cannot fingerprint dataset {source!r} for the statistics cache; pass --no-cache")
    return hashlib.sha256(f"hub:{source}:{fingerprint}".encode()).hexdigest()


@dataclass
class _Source:
    """A reference set of images, before its statistics exist: what it is (``kind``, ``describe``),
    how to read it (``make_images``) and a digest of its content (the cache key's part)."""

    kind: str
    describe: dict
    make_images: Callable[[], Dataset]
    digest: str


def _npz_source(path: Path, source: str) -> _Source:
    return _Source("npz-images", {"source": source, "kind": "npz", "images": "arr_0"},
                   functools.partial(npz_images, path), sha256_files([path], path.parent))


def _folder_source(path: Path, source: str, limit: int | None, use_cache: bool) -> _Source:
    files = _image_paths(path)[:limit]
    return _Source("folder", {"source": source, "kind": "image folder"}, functools.partial(ImageFiles, files),
                   sha256_files(files if use_cache else [], path))


def _dataset_source(source: str, resolution: int | None, split: str, limit: int | None, use_cache: bool) -> _Source:
    if resolution is None:
        raise ValueError(f"reference dataset {source!r} needs a resolution to centre-crop its images to")
    dataset = build_dataset(source, resolution=resolution, train=False, split=split)
    describe = {"source": source, "kind": "dataset", "split": split, "resolution": resolution}
    return _Source("dataset", describe, functools.partial(Uint8Images, dataset, limit),
                   _dataset_digest(source, dataset) if use_cache else "")


def load_reference(
    reference: str | os.PathLike | ReferenceStatistics,
    extractor: InceptionExtractor,
    *,
    resolution: int | None = None,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 50,
    num_workers: int | None = None,
) -> ReferenceStatistics:
    """Inception statistics of a reference set, computed once and cached.

    Args:
        reference: a ``.npz`` with mu/sigma (ADM batch or this tool's file; if it also holds
            ADM's ``arr_0`` images their features are computed for KID / precision-recall);
            a folder of images (read as they are; all must have one size unless ``resolution``
            is given, which centre-crops them); or any ``build_dataset`` source (``demo``, a hub
            dataset, a parquet file), centre-cropped to ``resolution``.
        resolution: side to centre-crop images to; required for datasets, optional for a folder
            (None keeps its images as they are, and they must then share one size).
        split, limit: dataset split; use only the first ``limit`` images.
        cache_dir, use_cache: where statistics of image sets are kept (``default_cache_dir()``),
            keyed by the images' content, the preprocessing and the Inception weights' digest.

    Returns the statistics on every process (all processes must call this together).
    """
    if isinstance(reference, ReferenceStatistics):
        return reference
    source = os.fspath(reference)
    path = Path(source).expanduser()
    file_stats = None
    if path.suffix == ".npz":
        file_stats = ReferenceStatistics.load(path)
        with np.load(path, allow_pickle=False) as data:
            has_images = "arr_0" in data.files
        if file_stats.features is not None or not has_images:
            return file_stats
        images = _npz_source(path, source)
    elif _is_plain_image_folder(path) and resolution is None:
        images = _folder_source(path, source, limit, use_cache)
    else:
        images = _dataset_source(source, resolution, split, limit, use_cache)
    stats = _cached_statistics(images, extractor, resolution=resolution, split=split, limit=limit,
                               cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size,
                               num_workers=num_workers)
    if file_stats is not None:  # ADM batch: FID from the file's own mu/sigma, KID / PR from the images
        stats.mu, stats.sigma = file_stats.mu, file_stats.sigma
        stats.info.update(fid_statistics=str(path))
    return stats


def _cached_statistics(images: _Source, extractor: InceptionExtractor, *, resolution: int | None, split: str,
                       limit: int | None, cache_dir, use_cache: bool, batch_size: int,
                       num_workers: int | None) -> ReferenceStatistics:
    """The statistics of ``images`` from the cache, or computed (on every process) and cached."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    weights_digest = extractor.weights_info["sha256"] or extractor.weights_info["source"]
    key_fields = {"format": STATISTICS_FORMAT, "kind": images.kind, "content": images.digest,
                  "resolution": resolution, "split": split if images.kind == "dataset" else None, "limit": limit,
                  "weights": weights_digest}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.npz"

    cached = [cache_file.is_file() if use_cache else False]
    if state.num_processes > 1:
        broadcast_object_list(cached)  # the main process decides, so no process waits for another alone
    if cached[0]:
        stats = ReferenceStatistics.load(cache_file)
        stats.info.update(cached=True)
    else:
        dataset = images.make_images()
        if len(dataset) < 2:
            raise ValueError(f"reference {images.describe['source']!r} holds {len(dataset)} image(s); FID needs at "
                             "least 2")
        features, _ = extract_features(dataset, extractor, batch_size=batch_size, num_workers=num_workers,
                                       desc="reference")
        info = {**images.describe, "key": key, "inception_weights": extractor.weights_info}
        stats = ReferenceStatistics.from_features(features, info)
        if use_cache and state.is_main_process:
            stats.save(cache_file)
        stats.info.update(cached=False)
    stats.info.update(cache_file=str(cache_file) if use_cache else None)
    return stats


__all__ = ["ReferenceStatistics", "load_reference", "reference_kind", "default_cache_dir", "CACHE_DIR_ENV"]
