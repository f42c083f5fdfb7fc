"""The token cache: the stage-two data format that ``fullvq cache-tokens`` writes and training reads.

A cache is a folder::

    fullvq_tokens.json        # tokenizer path + sha256, codebook_size, grid, resolution, views,
                              # id2label, dtype, count; "complete": false until every shard is written
    shard-00000/ ...          # datasets.save_to_disk folders, memory-mapped when read
    codebook.safetensors      # with --latents: the tokenizer's effective codebook (K x D float32)

with columns ``tokens`` (num_augmentations x h*w ints: int16 when codebook_size <= 32,768, else
int32), ``label`` and ``index`` (the image's position in the source). Shard ``n`` holds source
images ``[n * shard_size, (n + 1) * shard_size)``; each shard folder carries ``fullvq_shard.json``
once it is complete. The quantized latents a DiT / flow head trains on are ``codebook[tokens]``
(exactly the tokenizer's z_q, at a 2-byte id per cell instead of D floats).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..io import sha256_files

CACHE_FILE = "fullvq_tokens.json"
CODEBOOK_FILE = "codebook.safetensors"
SHARD_DONE_FILE = "fullvq_shard.json"
CACHE_FORMAT = "fullvq-tokens"
CACHE_VERSION = 1


def token_dtype(codebook_size: int) -> str:
    """Storage dtype of token ids: ``"int16"`` when every id fits (K <= 32,768), else ``"int32"``."""
    return "int16" if codebook_size <= 2**15 else "int32"


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
    return sha256_files(files)


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
            done = read_shard_done(folder)
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


def read_shard_done(folder: Path) -> dict | None:
    """A shard folder's completion marker (its image and skip counts), or None while unfinished."""
    marker = folder / SHARD_DONE_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


__all__ = [
    "CACHE_FILE",
    "CODEBOOK_FILE",
    "SHARD_DONE_FILE",
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "TokenCache",
    "read_cache_info",
    "read_shard_done",
    "token_dtype",
    "tokenizer_sha256",
]
