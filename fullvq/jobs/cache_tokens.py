"""The ``cache-tokens`` job: encode a dataset once with a trained tokenizer into a token cache.

Each image is encoded in every view of an augmentation (``none``: the centre crop; ``flip``: the
centre crop and its mirror image; ``ten-crop``: LlamaGen's ten crops), so stage two trains on
codes without decoding a single image. The cache format is ``fullvq.jobs.token_cache``'s. Under
``accelerate launch`` process ``r`` of ``W`` writes shards ``r, r + W, ...``. A shard is written to a
temporary folder and renamed when complete, so re-running the same command (with any number of
processes) skips the finished ones. Command line: ``fullvq cache-tokens`` (``fullvq.commands``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data import ReadableSubset, build_dataset, check_resolution, eval_transform
from ..distributed import loader_options, my_share, process_state
from ..images import from_uint8
from ..io import atomic_file, atomic_folder, hold_folder, local_folder_or_hub_id, write_text
from ..tokenizer import FVQModel
from .token_cache import (
    CACHE_FILE,
    CACHE_FORMAT,
    CACHE_VERSION,
    CODEBOOK_FILE,
    SHARD_DONE_FILE,
    read_cache_info,
    read_shard_done,
    token_dtype,
    tokenizer_sha256,
)

# LlamaGen's ten-crop: short side resized to 1.1 R, centre 1.1 R square, then five R crops and their mirrors.
TEN_CROP_RANGE = 1.1
_TEN_CROP_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
AUGMENTATIONS: dict[str, tuple[str, ...]] = {
    "none": ("center",),
    "flip": ("center", "center_flip"),
    "ten-crop": _TEN_CROP_NAMES + tuple(f"{name}_flip" for name in _TEN_CROP_NAMES),
}
# Settings that must agree for a re-run to continue an unfinished cache.
_RESUME_KEYS = ("tokenizer_sha256", "codebook_size", "grid", "resolution", "augmentation", "source", "split",
                "shard_size", "num_source_images")


def augmentation_views(resolution: int, augmentation: str = "flip", uint8: bool = False):
    """A transform: RGB PIL image -> (num_augmentations, 3, R, R) float32 in [-1, 1] (``uint8``: the
    uint8 pixels, for ``fullvq.images.from_uint8`` on the device), views in the order of
    ``AUGMENTATIONS[augmentation]``."""
    from torchvision.transforms import v2


    resolution = check_resolution(resolution)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not one of {list(AUGMENTATIONS)}")
    if augmentation != "ten-crop":
        centre = eval_transform(resolution, uint8=uint8)

        def views(image):
            view = centre(image)
            return torch.stack([view, view.flip(-1)]) if augmentation == "flip" else view[None]

        return views

    crop_size = int(round(resolution * TEN_CROP_RANGE))
    enlarge = v2.Compose([v2.Resize(crop_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                          v2.CenterCrop(crop_size)])
    to_model = eval_transform(resolution, uint8=uint8)  # on an R x R crop: resize and centre crop are no-ops
    ten_crop = v2.TenCrop(resolution)

    def views(image):
        return torch.stack([to_model(crop) for crop in ten_crop(enlarge(image))])

    return views


def _collate(items):
    """``ReadableSubset`` items -> (views, labels, indices) of the readable ones (None when none is)."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    return (torch.stack([item["pixel_values"] for item, _ in items]), [int(item["label"]) for item, _ in items],
            [index for _, index in items])


def cache_tokens(
    tokenizer: str | os.PathLike,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    resolution: int | None = None,
    augmentation: str = "flip",
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    shard_size: int = 10_000,
    num_workers: int | None = None,
    limit: int | None = None,
    latents: bool = False,
) -> dict:
    """Encode ``source`` with the tokenizer saved in folder ``tokenizer`` into a token cache at
    ``output_dir`` (see ``fullvq.jobs.token_cache`` for the layout). Runs on every process of an
    ``accelerate launch``; re-running the same call finishes an interrupted cache.

    Args:
        tokenizer: an ``FVQModel.save_pretrained`` folder (single-codebook quantizer).
        source, split, image_column, label_column: as for :func:`fullvq.data.build_dataset`.
        resolution: image side R (default: the tokenizer's ``sample_size``, which is what a pipeline
            built on the tokens expects); the token grid is ``tokenizer.latent_grid(R, R)``.
        augmentation: ``"none"``, ``"flip"`` (centre crop + mirror) or ``"ten-crop"``.
        batch_size: images per batch (each with all its views); the encoder takes the views in chunks
            of at most ``ENCODE_CHUNK`` images.
        shard_size: images per shard folder.
        num_workers: DataLoader workers decoding images (default: 8 on a GPU, 0 on the CPU).
        limit: encode only the first ``limit`` source images (quick trials).
        latents: also store the tokenizer's codebook, so the cache serves a DiT / flow head (its
            latents are ``codebook[tokens]``); may be added to a finished cache by re-running.

    Returns:
        The cache description written to ``fullvq_tokens.json``.
    """
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"augmentation={augmentation!r} is not one of {list(AUGMENTATIONS)}")
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"batch_size={batch_size} and shard_size={shard_size} must both be >= 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} (--max-images) would cache no image; pass a positive number, or none to "
                          "cache every image")
    tokenizer_dir = Path(local_folder_or_hub_id(tokenizer, "tokenizer", hub=False)).resolve()
    output_dir = Path(output_dir)
    state = process_state()
    # One writer per cache: the main process holds the folder's lock until the cache is written.
    with hold_folder(output_dir, "fullvq cache-tokens") if state.is_main_process else contextlib.nullcontext():
        model = _load_tokenizer(tokenizer_dir, state.device)
        resolution = int(model.config.sample_size) if resolution is None else resolution
        factor = model.downsample_factor
        if resolution % factor:
            raise ConfigError(f"resolution={resolution} is not divisible by the tokenizer's downsample factor "
                              f"{factor}; use a multiple of {factor}")
        with state.main_process_first():  # one process fills the `datasets` cache, the others then read it
            views = augmentation_views(resolution, augmentation, uint8=True)  # uint8 through the workers
            dataset = build_dataset(source, resolution=resolution, train=False, split=split, image_column=image_column,
                                    label_column=label_column, transform=views)
        total = len(dataset) if limit is None else min(limit, len(dataset))
        info = _describe(model, tokenizer_dir, dataset, source=source, split=split, resolution=resolution,
                         augmentation=augmentation, shard_size=shard_size, total=total)
        # Every process checks an existing cache itself, so a refusal stops all of them alike.
        _check_resumable(output_dir, info)
        names = [f"shard-{n:05d}" for n in range(max(1, -(-total // shard_size)))]
        # The unfinished shards, read before any process writes one, then split: a resumed run stays balanced.
        unfinished = [n for n in range(len(names)) if read_shard_done(output_dir / names[n]) is None]
        state.wait_for_everyone()
        if state.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text(output_dir / CACHE_FILE, json.dumps(info, indent=2))
        state.wait_for_everyone()

        mine = my_share(unfinished, state.process_index, state.num_processes)
        _encode_shards(model, dataset, output_dir, names, mine, info, batch_size=batch_size, num_workers=num_workers)
        state.wait_for_everyone()
        if state.is_main_process:
            _finish(model, output_dir, names, info, latents)
        state.wait_for_everyone()
        return read_cache_info(output_dir)


def _load_tokenizer(folder: Path, device):
    return FVQModel.from_pretrained(str(folder)).to(device).eval()


def _describe(model, tokenizer_dir: Path, dataset, *, source, split: str, resolution: int, augmentation: str,
              shard_size: int, total: int) -> dict:
    """The ``fullvq_tokens.json`` of a cache being written (``"complete": False``)."""
    source_name = os.fspath(source)
    if os.path.exists(source_name):
        source_name = os.path.abspath(source_name)
    codebook_size = int(model.config.codebook_size)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "complete": False,
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir),
        "codebook_size": codebook_size,
        "grid": list(model.latent_grid(resolution, resolution)),
        "resolution": resolution,
        "augmentation": augmentation,
        "augmentations": list(AUGMENTATIONS[augmentation]),
        "num_augmentations": len(AUGMENTATIONS[augmentation]),
        "dtype": token_dtype(codebook_size),
        "source": source_name,
        "split": split,
        "shard_size": shard_size,
        "num_source_images": total,
        "id2label": {str(k): v for k, v in dataset.id2label.items()},
        "num_classes": dataset.num_classes,
    }


def _check_resumable(output_dir: Path, info: dict) -> None:
    """Refuse to add to a cache made with other settings."""
    if not (output_dir / CACHE_FILE).is_file():
        return
    old = json.loads((output_dir / CACHE_FILE).read_text())
    changed = [key for key in _RESUME_KEYS if old.get(key) != info[key]]
    if changed:
        listing = ", ".join(f"{key}: {old.get(key)!r} -> {info[key]!r}" for key in changed)
        raise ConfigError(f"{output_dir} holds tokens made with other settings ({listing}); choose another "
                          "--output folder, or delete it to start afresh")


def _encode_shards(model, dataset, output_dir: Path, names: list[str], mine: list[int], info: dict, *,
                   batch_size: int, num_workers: int | None) -> None:
    """Shards ``mine`` (this process's share of the unfinished ones), each encoded and written whole."""
    from tqdm.auto import tqdm

    state = process_state()
    total, shard_size, dtype = info["num_source_images"], info["shard_size"], info["dtype"]
    todo = sum(min(total, (n + 1) * shard_size) - n * shard_size for n in mine)
    bar = tqdm(total=todo, unit="img", disable=not state.is_local_main_process,
               desc=f"caching tokens ({state.num_processes} process{'es' if state.num_processes > 1 else ''})")
    for n in mine:
        indices = list(range(n * shard_size, min(total, (n + 1) * shard_size)))
        loader = DataLoader(ReadableSubset(dataset, indices), batch_size=batch_size, collate_fn=_collate,
                            **loader_options(num_workers, state.device))
        tokens, labels, kept = [], [], []
        for batch in loader:
            if batch is None:
                continue
            views, batch_labels, batch_indices = batch
            b, a = views.shape[:2]
            codes = _encode(model, views.flatten(0, 1), state.device)
            if codes.ndim != 3:
                raise ValueError(f"the tokenizer returns indices of shape {tuple(codes.shape)}, not one (h, w) grid "
                                 "per image; cache-tokens supports single-codebook quantizers")
            tokens.append(codes.reshape(b, a, -1).cpu().numpy().astype(dtype))
            labels += batch_labels
            kept += batch_indices
            bar.update(b)
        skipped = len(indices) - len(kept)
        bar.update(skipped)
        array = np.concatenate(tokens) if tokens else None
        _write_shard(output_dir / names[n], array, labels, kept, dtype, skipped, state.process_index)
    bar.close()


# Images per encoder call: ten-crop at batch 64 is 640 images, whose 128-channel full-resolution
# activations alone would take ~60 GB in float32.
ENCODE_CHUNK = 128


@torch.no_grad()
def _encode(model, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Code indices of uint8 ``views`` (N, 3, R, R), in chunks of ``ENCODE_CHUNK``; on a GPU the encoder
    runs under bf16 autocast (the nearest-code search stays float32 whatever autocast says)."""
    chunks = []
    for start in range(0, len(views), ENCODE_CHUNK):
        images = from_uint8(views[start : start + ENCODE_CHUNK].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(model.encode_indices(images))
    return torch.cat(chunks)


def _write_shard(folder: Path, tokens: np.ndarray | None, labels: list[int], indices: list[int], dtype: str,
                 skipped: int, process_index: int) -> None:
    """Write one shard atomically: a temporary folder renamed to ``folder`` once complete. A shard
    already complete is kept as it is (so writing one twice changes nothing)."""
    import datasets

    if read_shard_done(folder) is not None:
        return

    with atomic_folder(folder, overwrite=True) as staging:
        if len(labels):
            features = datasets.Features({
                "tokens": datasets.Array2D(shape=tuple(tokens.shape[1:]), dtype=dtype),
                "label": datasets.Value("int64"),
                "index": datasets.Value("int64"),
            })
            table = datasets.Dataset.from_dict({"tokens": tokens, "label": np.asarray(labels, dtype=np.int64),
                                                "index": np.asarray(indices, dtype=np.int64)}, features=features)
            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                table.save_to_disk(str(staging))
            finally:
                if bars:
                    datasets.enable_progress_bars()
        # Every image unreadable: `datasets` cannot reload an empty table, so only the marker.
        marker = {"count": len(labels), "skipped": skipped, "process_index": process_index}
        (staging / SHARD_DONE_FILE).write_text(json.dumps(marker))


def _finish(model, output_dir: Path, names: list[str], info: dict, latents: bool) -> None:
    """Main process, once every shard is written: mark the cache complete (and store the codebook)."""
    done = [read_shard_done(output_dir / name) for name in names]
    missing = [name for name, d in zip(names, done, strict=True) if d is None]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {output_dir} were not written; re-run the same command")
    info.update(complete=True, shards=names, count=sum(d["count"] for d in done),
                num_skipped=sum(d["skipped"] for d in done))
    if latents:
        from safetensors.torch import save_file

        with torch.no_grad():
            codebook = model.quantize.codebook().float().cpu().contiguous()
        with atomic_file(output_dir / CODEBOOK_FILE) as staging:
            save_file({"codebook": codebook}, str(staging), metadata={"tokenizer_sha256": info["tokenizer_sha256"]})
        info["latents"] = {"codebook": CODEBOOK_FILE, "codebook_dim": int(codebook.shape[1])}
    write_text(output_dir / CACHE_FILE, json.dumps(info, indent=2))
    grid = info["grid"]
    print(f"wrote {info['count']} images x {info['num_augmentations']} views of {grid[0]}x{grid[1]} tokens to "
          f"{output_dir} ({info['num_skipped']} unreadable skipped)")


__all__ = ["AUGMENTATIONS", "augmentation_views", "cache_tokens"]
