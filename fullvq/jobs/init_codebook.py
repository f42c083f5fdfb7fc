"""The ``init-codebook`` job: a VQGAN-LC codebook of k-means centres of vision-encoder patch features.

Loads a ``transformers`` ViT-style backbone (``fullvq.tokenizer.patch_features``), extracts the
patch features of a dataset and clusters them (``fullvq.tokenizer.kmeans``) to N centres, globally
or per class (VQGAN-LC's recipe: 100 centres for each of ImageNet's 1,000 classes, on patch
features average-pooled 4x per side). The file holds one float32 ``codebook`` tensor
(N x feature_dim) that ``LCQuantizer.load_codebook`` reads; beside it go ``<stem>_stats.json`` and
``<stem>_cluster_sizes.png``. Command line: ``fullvq init-codebook`` (``fullvq.commands.init_codebook``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import build_dataset
from ..io import atomic_file, write_text
from ..tokenizer.kmeans import KMeansResult, kmeans
from ..tokenizer.patch_features import PatchFeatureExtractor, extract_patch_features, iter_features, tokens_per_image
from ..tokenizer.quantizers.projected import LCQuantizer

TOO_FEW = "; lower --num-codes, add images, or lower --pool-factor / raise --features-per-image"


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
    started = time.time()
    out = Path(out).expanduser()
    _check_request(out, overwrite, num_codes=num_codes, pool_factor=pool_factor,
                   features_per_image=features_per_image, max_images=max_images, num_iters=num_iters)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = PatchFeatureExtractor.from_pretrained(encoder, image_size=image_size, feature_space=feature_space,
                                                      device=device, dtype=dtype)
    dataset = build_dataset(data, resolution=extractor.image_size, train=False, split=split,
                            require_labels=per_class, image_column=image_column, label_column=label_column,
                            cache_dir=cache_dir)
    per_image = tokens_per_image(extractor, pool_factor)
    if features_per_image is not None:
        per_image = min(per_image, features_per_image)
    run = _Run(extractor, dataset, per_image, max_images, seed, progress,
               extract=dict(pool_factor=pool_factor, features_per_image=features_per_image, batch_size=batch_size,
                            num_workers=num_workers, seed=seed, progress=progress),
               cluster=dict(num_iters=num_iters, tol=tol, init=init, device=device, chunk_size=chunk_size))
    result = _per_class_codebook(run, num_codes) if per_class else _global_codebook(run, num_codes, feature_cache)

    metadata = {"encoder": os.fspath(encoder), "feature_dim": result.centers.shape[1],
                "num_codes": result.centers.shape[0], "clustering": "per-class" if per_class else "global",
                "feature_space": feature_space, "pool_factor": pool_factor, "image_size": extractor.image_size}
    save_codebook(result.centers, out, metadata)
    _check_loads_into_lc(result.centers, out)
    settings = {"data": os.fspath(data), "split": split, "init": init, "num_iters": num_iters, "tol": tol,
                "seed": seed, "device": str(device)}
    return _write_stats(out, result, metadata, settings, skipped=len(run.skipped), seconds=time.time() - started)


@dataclass
class _Run:
    """What both clustering modes share: the encoder, the images, and the settings of the two passes."""

    extractor: PatchFeatureExtractor
    dataset: torch.utils.data.Dataset
    per_image: int  # features one image gives
    max_images: int | None
    seed: int
    progress: bool
    extract: dict  # iter_features / extract_patch_features settings
    cluster: dict  # kmeans settings
    skipped: list[int] = field(default_factory=list)  # positions of unreadable images
    generator: torch.Generator = None

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.extract = {**self.extract, "skipped": self.skipped}

    def subsample(self, indices: list[int]) -> list[int]:
        """At most ``max_images`` of ``indices``, drawn at random (seeded), in their order."""
        if self.max_images is None or len(indices) <= self.max_images:
            return indices
        pick = torch.randperm(len(indices), generator=self.generator)[: self.max_images].sort().values
        return [indices[i] for i in pick.tolist()]


@dataclass
class _Clustered:
    """The centres of either mode and what the stats file and plot say about them."""

    centers: torch.Tensor
    sizes: torch.Tensor
    inertia: float
    num_features: int
    num_images: int
    curve: list[float]  # inertia per feature: by iteration (global) or by class (per class)
    curve_label: str
    details: dict


def _check_request(out: Path, overwrite: bool, **counts) -> None:
    """Refuse bad settings and an existing ``out`` before anything is loaded."""
    for name, value in counts.items():
        _check_positive(name, value, allow_none=name in ("features_per_image", "max_images"))
    if out.suffix != ".safetensors":
        raise ValueError(f"--output {str(out)!r} must end in .safetensors (the lc quantizer reads that format)")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it or choose another --output")


def _global_codebook(run: _Run, num_codes: int, feature_cache) -> _Clustered:
    """All (subsampled) images' features clustered together to ``num_codes`` centres."""
    indices = run.subsample(list(range(len(run.dataset))))
    if num_codes > len(indices) * run.per_image:  # checked before the slow part
        raise ValueError(f"num_codes={num_codes} is larger than the {len(indices) * run.per_image} features "
                         f"that {len(indices)} images give ({run.per_image} each){TOO_FEW}")
    features = extract_patch_features(run.extractor, run.dataset, indices, cache_path=feature_cache, **run.extract)
    if num_codes > len(features):
        raise ValueError(f"num_codes={num_codes} is larger than the {len(features)} features of the "
                         f"{len(indices) - len(run.skipped)} readable images{TOO_FEW}")
    result = kmeans(features, num_codes, seed=run.seed, progress=run.progress, **run.cluster)
    return _Clustered(
        result.centers, result.cluster_sizes, result.inertia, len(features), len(indices) - len(run.skipped),
        curve=[value / len(features) for value in result.inertia_history], curve_label="iteration",
        details={"inertia_history": result.inertia_history, "iterations": result.num_iterations,
                 "reseeded_clusters": result.num_reseeded},
    )


def _per_class_codebook(run: _Run, num_codes: int) -> _Clustered:
    """Each class's features clustered to its share of ``num_codes``; centres concatenated in class order.

    One pass over the images sorted by class; a class is clustered as soon as it is complete, so
    only one class's features are held at a time.
    """
    dataset = run.dataset
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
    by_class = {label: run.subsample(members) for label, members in by_class.items()}
    quota = dict(zip(classes, split_codes(num_codes, len(classes)), strict=True))
    name = lambda label: dataset.id2label.get(label, str(label))  # noqa: E731
    for label in classes:
        if quota[label] > len(by_class[label]) * run.per_image:
            raise ValueError(f"class {name(label)!r} has {len(by_class[label]) * run.per_image} features "
                             f"({len(by_class[label])} images), fewer than its {quota[label]} codes{TOO_FEW}")

    def cluster(label: int, features: list[torch.Tensor]) -> KMeansResult:
        class_features = torch.cat(features) if features else torch.empty(0, run.extractor.feature_dim)
        if quota[label] > len(class_features):
            raise ValueError(f"class {name(label)!r} has {len(class_features)} features of readable images, "
                             f"fewer than its {quota[label]} codes{TOO_FEW}")
        return kmeans(class_features, quota[label], seed=run.seed + label, progress=run.progress,
                      desc=f"k-means {name(label)}", **run.cluster)

    order = [index for label in classes for index in by_class[label]]
    owner = [label for label in classes for _ in by_class[label]]
    results = _stream_by_class(run, order, owner, classes, cluster)
    sizes = torch.cat([results[label].cluster_sizes for label in classes])
    return _Clustered(
        torch.cat([results[label].centers for label in classes]), sizes,
        sum(results[label].inertia for label in classes), int(sizes.sum()), len(order) - len(run.skipped),
        curve=[results[label].inertia / max(1, int(results[label].cluster_sizes.sum())) for label in classes],
        curve_label="class id",
        details={"codes_per_class": {name(label): quota[label] for label in classes},
                 "inertia_per_class": {name(label): results[label].inertia for label in classes},
                 "reseeded_clusters": sum(results[label].num_reseeded for label in classes)},
    )


def _stream_by_class(run: _Run, order: list[int], owner: list[int], classes: list[int],
                     cluster: Callable[[int, list[torch.Tensor]], KMeansResult]) -> dict[int, KMeansResult]:
    """Features of ``order`` (images sorted by class; ``owner`` their classes), handed to ``cluster``
    one class at a time as soon as that class is complete."""
    results: dict[int, KMeansResult] = {}
    pending: list[torch.Tensor] = []
    current = 0  # index into classes of the class being gathered
    for positions, features in iter_features(run.extractor, run.dataset, order, **run.extract):
        for position, rows in zip(positions.tolist(), features, strict=True):
            while owner[position] != classes[current]:
                results[classes[current]] = cluster(classes[current], pending)
                pending = []
                current += 1
            pending.append(rows)
    while current < len(classes):
        results[classes[current]] = cluster(classes[current], pending)
        pending = []
        current += 1
    return results


def _check_loads_into_lc(centers: torch.Tensor, out: Path) -> None:
    """The point of the file: it must load into the lc quantizer as is (shape and dtype checked there)."""
    LCQuantizer(centers.shape[0], 1, feature_dim=centers.shape[1]).load_codebook(out)


def _write_stats(out: Path, result: _Clustered, metadata: dict, settings: dict, *, skipped: int,
                 seconds: float) -> dict:
    """``<stem>_stats.json`` and ``<stem>_cluster_sizes.png`` beside the codebook; returns the stats."""
    stats_json, stats_png = stats_paths(out)
    stats = {
        **metadata,
        "data": settings["data"],
        "split": settings["split"],
        "codebook": str(out),
        "images": result.num_images,
        "features": result.num_features,
        "skipped_images": skipped,
        **{key: settings[key] for key in ("init", "num_iters", "tol", "seed", "device")},
        "inertia": result.inertia,
        "inertia_per_feature": result.inertia / max(1, result.num_features),
        "cluster_sizes": _size_histogram(result.sizes),
        **result.details,
        "seconds": round(seconds, 3),
        "stats_png": str(stats_png),
    }
    write_text(stats_json, json.dumps(stats, indent=2) + "\n")
    encoder = os.path.basename(metadata["encoder"])
    _plot_stats(stats_png, result.sizes, result.curve, result.curve_label,
                f"{result.centers.shape[0]} codes x {result.centers.shape[1]} from {encoder} "
                f"({'per class' if metadata['clustering'] == 'per-class' else 'global'})")
    return stats


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
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=110, format="png")
    plt.close(figure)


def save_codebook(codebook: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``{"codebook": float32 (N, D)}`` as safetensors (string metadata alongside)."""
    from safetensors.torch import save_file

    with atomic_file(path) as staging:
        save_file({"codebook": codebook.float().contiguous()}, os.fspath(staging),
                  metadata={key: str(value) for key, value in (metadata or {}).items()})


def stats_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON and PNG written beside a codebook file: ``<stem>_stats.json``, ``<stem>_cluster_sizes.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_stats.json"), out.with_name(f"{out.stem}_cluster_sizes.png")


__all__ = ["init_codebook", "split_codes", "save_codebook", "stats_paths"]
