"""Image sets as uint8 (3, H, W) tensors, the form Inception reads: a fullvq dataset, image files,
or the (N, H, W, 3) array of an ADM reference batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fullvq.images import to_uint8


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


def npz_images(path: Path) -> _ArrayImages:
    """The images stored under ``arr_0`` of a ``.npz`` file (an ADM reference batch)."""
    with np.load(path, allow_pickle=False) as data:
        return _ArrayImages(data["arr_0"])


__all__ = ["Uint8Images", "ImageFiles", "npz_images"]
