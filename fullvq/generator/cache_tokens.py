"""``fullvq cache-tokens``: encode a dataset once with a trained tokenizer into token shards.

Each image is encoded in every view of an augmentation (``none``: the centre crop; ``flip``: the
centre crop and its mirror image; ``ten-crop``: LlamaGen's ten crops), so stage two trains on
codes without decoding a single image. The cache is a folder::

    fullvq_tokens.json        # tokenizer path + sha256, codebook_size, grid, resolution, views,
                              # id2label, dtype, count; "complete": false until every shard is written
    shard-00000/ ...          # datasets.save_to_disk folders, memory-mapped when read

with columns ``tokens`` (num_augmentations x h*w ints: int16 when codebook_size <= 32,768, else
int32), ``label`` and ``index`` (the image's position in the source). ``--latents`` also stores
the tokenizer's effective codebook (``codebook.safetensors``, K x D float32): the quantized latents
a DiT / flow head trains on are then read as ``codebook[tokens]`` (exactly the tokenizer's z_q, at
a 2-byte id per cell instead of D floats). Shard ``n`` holds source
images ``[n * shard_size, (n + 1) * shard_size)``; under ``accelerate launch`` process ``r`` of
``W`` writes shards ``r, r + W, ...``. A shard is written to a temporary folder and renamed when
complete, so re-running the same command (with any number of processes) skips the finished ones.

    fullvq cache-tokens --tokenizer runs/tokenizer/model --source demo --output tokens/demo
    accelerate launch -m fullvq.cli cache-tokens --tokenizer ... --augmentation ten-crop ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError

CACHE_FILE = "fullvq_tokens.json"
CODEBOOK_FILE = "codebook.safetensors"
SHARD_DONE_FILE = "fullvq_shard.json"
CACHE_FORMAT = "fullvq-tokens"
CACHE_VERSION = 1
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


# ----------------------------------------------------------------------------- views


def token_dtype(codebook_size: int) -> str:
    """Storage dtype of token ids: ``"int16"`` when every id fits (K <= 32,768), else ``"int32"``."""
    return "int16" if codebook_size <= 2**15 else "int32"


def augmentation_views(resolution: int, augmentation: str = "flip"):
    """A transform: RGB PIL image -> (num_augmentations, 3, R, R) float32 in [-1, 1], views in the
    order of ``AUGMENTATIONS[augmentation]``."""
    from torchvision.transforms import v2

    from ..data import check_resolution, eval_transform

    resolution = check_resolution(resolution)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not one of {list(AUGMENTATIONS)}")
    if augmentation != "ten-crop":
        centre = eval_transform(resolution)

        def views(image):
            view = centre(image)
            return torch.stack([view, view.flip(-1)]) if augmentation == "flip" else view[None]

        return views

    crop_size = int(round(resolution * TEN_CROP_RANGE))
    enlarge = v2.Compose([v2.Resize(crop_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                          v2.CenterCrop(crop_size)])
    to_model = eval_transform(resolution)  # on an R x R crop: resize and centre crop are no-ops
    ten_crop = v2.TenCrop(resolution)

    def views(image):
        return torch.stack([to_model(crop) for crop in ten_crop(enlarge(image))])

    return views


def tokenizer_sha256(folder: str | os.PathLike) -> str:
    """sha256 of a saved tokenizer's weights: its ``*.safetensors`` file(s), in name order (for the
    usual single file this is what ``sha256sum`` prints)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {folder}; pass a tokenizer folder written by FVQModel.save_pretrained "
            "(e.g. <train.output_dir>/model of fullvq train-tokenizer)"
        )
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading a cache


class TokenCache(Dataset):
    """A finished token cache: ``cache[i]`` is ``{"tokens": (num_augmentations, h*w) long, "label": int,
    "index": int}``; ``info`` is the parsed ``fullvq_tokens.json`` (``id2label`` with int keys)."""

    def __init__(self, path: str | os.PathLike):
        import datasets

        self.path = Path(path)
        self.info = read_cache_info(self.path)
        if not self.info.get("complete"):
            raise ConfigError(
                f"token cache {self.path} is unfinished (caching stopped before every shard was written); re-run "
                "the same fullvq cache-tokens command to finish it (finished shards are kept)"
            )
        tables = []
        for name in self.info["shards"]:
            folder = self.path / name
            done = _read_shard_done(folder)
            if done is None:
                raise ConfigError(f"token cache {self.path} lacks its shard {name}; re-run fullvq cache-tokens with "
                                  "the same arguments to rewrite it")
            if done["count"]:
                tables.append(datasets.load_from_disk(str(folder)))
        if not tables:
            raise ConfigError(f"token cache {self.path} holds no images (all {self.info['num_skipped']} unreadable)")
        self.table = datasets.concatenate_datasets(tables).with_format("numpy")
        if len(self.table) != self.info["count"]:
            raise ConfigError(f"token cache {self.path} holds {len(self.table)} rows but its {CACHE_FILE} says "
                              f"{self.info['count']}; the folder is damaged: re-create it with fullvq cache-tokens")

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.info["grid"])

    @property
    def num_augmentations(self) -> int:
        return self.info["num_augmentations"]

    def codebook(self) -> torch.Tensor:
        """The (K, D) codebook stored by ``cache-tokens --latents``: latents are ``codebook[tokens]``."""
        from safetensors.torch import load_file

        path = self.path / CODEBOOK_FILE
        if not self.info.get("latents") or not path.is_file():
            raise ConfigError(f"token cache {self.path} holds token ids only; re-run the same fullvq cache-tokens "
                              "command with --latents to add the codebook the latents are read through "
                              "(finished shards are kept)")
        return load_file(str(path))["codebook"]

    def labels(self) -> np.ndarray:
        """Every image's class label (int64), without reading the tokens."""
        return np.asarray(self.table["label"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        row = self.table[int(index)]
        return {"tokens": torch.from_numpy(np.asarray(row["tokens"], dtype=np.int64)), "label": int(row["label"]),
                "index": int(row["index"])}

    def __repr__(self) -> str:
        h, w = self.grid
        return (f"TokenCache({str(self.path)!r}, images={len(self)}, grid={h}x{w}, "
                f"augmentations={self.info['augmentations']}, codebook_size={self.info['codebook_size']})")


def read_cache_info(path: str | os.PathLike) -> dict:
    """The ``fullvq_tokens.json`` of a token cache folder, ``id2label`` keys as ints."""
    file = Path(path) / CACHE_FILE
    if not file.is_file():
        raise ConfigError(f"{path} is not a token cache (no {CACHE_FILE}); make one with fullvq cache-tokens")
    info = json.loads(file.read_text())
    if info.get("format") != CACHE_FORMAT:
        raise ConfigError(f"{file} is not a {CACHE_FORMAT} file; make the cache with fullvq cache-tokens")
    info["id2label"] = {int(k): v for k, v in info.get("id2label", {}).items()}
    return info


def _read_shard_done(folder: Path) -> dict | None:
    marker = folder / SHARD_DONE_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


# ----------------------------------------------------------------------------- writing a cache


class _Views(Dataset):
    """Source images ``indices`` as all their views; unreadable ones come back as None (dropped)."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        item = self.source.load(index, substitute=False)
        return None if item is None else (item["pixel_values"], int(item["label"]), index)


def _collate(items):
    items = [item for item in items if item is not None]
    if not items:
        return None
    views, labels, indices = zip(*items)
    return torch.stack(views), list(labels), list(indices)


def _write_shard(folder: Path, tokens: np.ndarray | None, labels: list[int], indices: list[int], dtype: str,
                 skipped: int, process_index: int) -> None:
    """Write one shard atomically: a temporary folder renamed to ``folder`` once complete."""
    import datasets

    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
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
            table.save_to_disk(str(tmp))
        finally:
            if bars:
                datasets.enable_progress_bars()
    else:  # every image unreadable: `datasets` cannot reload an empty table, so only the marker
        tmp.mkdir(parents=True)
    marker = {"count": len(labels), "skipped": skipped, "process_index": process_index}
    (tmp / SHARD_DONE_FILE).write_text(json.dumps(marker))
    os.replace(tmp, folder)


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
    num_workers: int = 2,
    limit: int | None = None,
    latents: bool = False,
) -> dict:
    """Encode ``source`` with the tokenizer saved in folder ``tokenizer`` into a token cache at
    ``output_dir`` (see the module docstring for the layout). Runs on every process of an
    ``accelerate launch``; re-running the same call finishes an interrupted cache.

    Args:
        tokenizer: an ``FVQModel.save_pretrained`` folder (single-codebook quantizer).
        source, split, image_column, label_column: as for :func:`fullvq.data.build_dataset`.
        resolution: image side R (default: the tokenizer's ``sample_size``, which is what a pipeline
            built on the tokens expects); the token grid is ``tokenizer.latent_grid(R, R)``.
        augmentation: ``"none"``, ``"flip"`` (centre crop + mirror) or ``"ten-crop"``.
        batch_size: images per encoder batch (each with all its views).
        shard_size: images per shard folder.
        limit: encode only the first ``limit`` source images (quick trials).
        latents: also store the tokenizer's codebook, so the cache serves a DiT / flow head (its
            latents are ``codebook[tokens]``); may be added to a finished cache by re-running.

    Returns:
        The cache description written to ``fullvq_tokens.json``.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from ..data import build_dataset
    from ..tokenizer import FVQModel

    if augmentation not in AUGMENTATIONS:
        raise ConfigError(f"augmentation={augmentation!r} is not one of {list(AUGMENTATIONS)}")
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"batch_size={batch_size} and shard_size={shard_size} must both be >= 1")
    tokenizer_dir, output_dir = Path(tokenizer).resolve(), Path(output_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist; pass the <output_dir>/model "
                                "folder of a fullvq train-tokenizer run")
    # `accelerate launch` on CPU sets ACCELERATE_USE_CPU, which only AcceleratorState reads by itself.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    model = FVQModel.from_pretrained(str(tokenizer_dir)).to(state.device).eval()
    factor = model.downsample_factor
    resolution = int(model.config.sample_size) if resolution is None else resolution
    if resolution % factor:
        raise ConfigError(f"resolution={resolution} is not divisible by the tokenizer's downsample factor {factor}; "
                          f"use a multiple of {factor}")
    grid = model.latent_grid(resolution, resolution)
    codebook_size = int(model.config.codebook_size)
    dtype = token_dtype(codebook_size)

    with state.main_process_first():  # one process fills the `datasets` cache, the others then read it
        dataset = build_dataset(source, resolution=resolution, train=False, split=split, image_column=image_column,
                                label_column=label_column)
    dataset.transform = augmentation_views(resolution, augmentation)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    source_name = os.fspath(source)
    if os.path.exists(source_name):
        source_name = os.path.abspath(source_name)
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "complete": False,
        "tokenizer": str(tokenizer_dir),
        "tokenizer_sha256": tokenizer_sha256(tokenizer_dir),
        "codebook_size": codebook_size,
        "grid": list(grid),
        "resolution": resolution,
        "augmentation": augmentation,
        "augmentations": list(AUGMENTATIONS[augmentation]),
        "num_augmentations": len(AUGMENTATIONS[augmentation]),
        "dtype": dtype,
        "source": source_name,
        "split": split,
        "shard_size": shard_size,
        "num_source_images": total,
        "id2label": {str(k): v for k, v in dataset.id2label.items()},
        "num_classes": dataset.num_classes,
    }
    # Every process checks an existing cache itself, so a refusal stops all of them alike.
    if (output_dir / CACHE_FILE).is_file():
        old = json.loads((output_dir / CACHE_FILE).read_text())
        changed = [key for key in _RESUME_KEYS if old.get(key) != info[key]]
        if changed:
            listing = ", ".join(f"{key}: {old.get(key)!r} -> {info[key]!r}" for key in changed)
            raise ConfigError(f"{output_dir} holds tokens made with other settings ({listing}); choose another "
                              "--output folder, or delete it to start afresh")
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CACHE_FILE).write_text(json.dumps(info, indent=2))
    state.wait_for_everyone()

    num_shards = max(1, -(-total // shard_size))
    names = [f"shard-{n:05d}" for n in range(num_shards)]
    mine = [n for n in range(state.process_index, num_shards, state.num_processes)
            if _read_shard_done(output_dir / names[n]) is None]
    todo = sum(min(total, (n + 1) * shard_size) - n * shard_size for n in mine)
    bar = tqdm(total=todo, unit="img", disable=not state.is_local_main_process,
               desc=f"caching tokens ({state.num_processes} process{'es' if state.num_processes > 1 else ''})")
    for n in mine:
        indices = list(range(n * shard_size, min(total, (n + 1) * shard_size)))
        loader = DataLoader(_Views(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate)
        tokens, labels, kept = [], [], []
        for batch in loader:
            if batch is None:
                continue
            views, batch_labels, batch_indices = batch
            b, a = views.shape[:2]
            with torch.no_grad():
                codes = model.encode_indices(views.flatten(0, 1).to(state.device))
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
    state.wait_for_everyone()

    if state.is_main_process:
        done = [_read_shard_done(output_dir / name) for name in names]
        missing = [name for name, d in zip(names, done) if d is None]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {output_dir} were not written; re-run the same command")
        info.update(complete=True, shards=names, count=sum(d["count"] for d in done),
                    num_skipped=sum(d["skipped"] for d in done))
        if latents:
            from safetensors.torch import save_file

            with torch.no_grad():
                codebook = model.quantize.codebook().float().cpu().contiguous()
            partial = output_dir / (CODEBOOK_FILE + ".partial")
            save_file({"codebook": codebook}, str(partial), metadata={"tokenizer_sha256": info["tokenizer_sha256"]})
            partial.replace(output_dir / CODEBOOK_FILE)
            info["latents"] = {"codebook": CODEBOOK_FILE, "codebook_dim": int(codebook.shape[1])}
        (output_dir / CACHE_FILE).write_text(json.dumps(info, indent=2))
        print(f"wrote {info['count']} images x {info['num_augmentations']} views of {grid[0]}x{grid[1]} tokens to "
              f"{output_dir} ({info['num_skipped']} unreadable skipped)")
    state.wait_for_everyone()
    return read_cache_info(output_dir)


def main(argv: list[str] | None = None, prog: str = "fullvq cache-tokens") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, type=Path, help="FVQModel folder (<tokenizer run>/model)")
    parser.add_argument("--source", required=True, help="image folder, save_to_disk folder, hub dataset name, or demo")
    parser.add_argument("--output", required=True, type=Path, help="cache folder to write (or to finish)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the tokenizer's sample_size)")
    parser.add_argument("--augmentation", default="flip", choices=list(AUGMENTATIONS),
                        help="views per image: centre crop only, + its mirror (default), or LlamaGen's ten crops")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch, per process")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard folder")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--limit", type=int, default=None, help="cache only the first N images")
    parser.add_argument("--latents", action="store_true",
                        help="also store the codebook, so a DiT / flow head can train on the quantized latents")
    args = parser.parse_args(argv)
    try:
        cache_tokens(args.tokenizer, args.source, args.output, resolution=args.resolution,
                     augmentation=args.augmentation, split=args.split, image_column=args.image_column,
                     label_column=args.label_column, batch_size=args.batch_size, shard_size=args.shard_size,
                     num_workers=args.num_workers, limit=args.limit, latents=args.latents)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    return 0


__all__ = [
    "AUGMENTATIONS",
    "CACHE_FILE",
    "CODEBOOK_FILE",
    "TokenCache",
    "augmentation_views",
    "cache_tokens",
    "read_cache_info",
    "token_dtype",
    "tokenizer_sha256",
]
