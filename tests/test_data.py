"""Image datasets: folders, saved/parquet datasets, the hub path, the demo set, transforms, bad files."""

import io
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fullvq.data import (  # noqa: E402
    DemoDataset,
    build_dataset,
    eval_transform,
    load_image,
    to_rgb,
    train_transform,
)

RES = 16


def _random_rgb(rng, height, width):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _truncated_jpeg(rng) -> bytes:
    buffer = io.BytesIO()
    _random_rgb(rng, 64, 64).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small images plus one corrupt PNG, one truncated JPEG, grey, RGBA and palette."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(3):
            _random_rgb(rng, 20 + 5 * i, 30).save(root / name / f"{i}.png")
    (root / "cat" / "corrupt.png").write_bytes(rng.bytes(256))
    (root / "dog" / "truncated.jpg").write_bytes(_truncated_jpeg(rng))
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(root / "cat" / "grey.png")
    transparent = np.zeros((24, 24, 4), dtype=np.uint8)
    transparent[..., 0] = 255  # red, but fully transparent: must come out white
    Image.fromarray(transparent).save(root / "dog" / "clear.png")
    _random_rgb(rng, 24, 24).convert("P").save(root / "dog" / "palette.gif")
    return root


@pytest.fixture(scope="module")
def folder_dataset(image_folder, tmp_path_factory):
    return build_dataset(image_folder, resolution=RES, train=False, cache_dir=tmp_path_factory.mktemp("cache"))


def _index_of(dataset, filename):
    paths = [os.path.basename(cell["path"]) for cell in dataset.table[dataset.image_column]]
    return paths.index(filename)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_image_folder_items_have_the_right_shape_range_and_labels(folder_dataset):
    assert len(folder_dataset) == 11
    assert folder_dataset.id2label == {0: "cat", 1: "dog"}
    assert folder_dataset.num_classes == 2
    items = [folder_dataset[i] for i in range(len(folder_dataset))]
    for item in items:
        assert item["pixel_values"].shape == (3, RES, RES)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        assert item["label"] in (0, 1)
    assert folder_dataset.labels().count(0) == 5 and folder_dataset.labels().count(1) == 6


def test_unreadable_files_are_skipped_with_a_warning_and_counted(image_folder, tmp_path):
    dataset = build_dataset(image_folder, resolution=RES, train=False, cache_dir=tmp_path)
    corrupt = _index_of(dataset, "corrupt.png")
    with pytest.warns(RuntimeWarning, match="corrupt.png"):
        item = dataset[corrupt]  # replaced by the next readable image
    assert item["pixel_values"].shape == (3, RES, RES)
    assert dataset.num_skipped == 1

    truncated = _index_of(dataset, "truncated.jpg")
    with pytest.warns(RuntimeWarning, match="truncated.jpg"):
        dataset[truncated]
    assert dataset.num_skipped == 2
    assert sorted(os.path.basename(path) for path in dataset.skipped_files) == ["corrupt.png", "truncated.jpg"]

    dataset[corrupt]  # a known bad file is not counted (or warned about) twice
    assert dataset.num_skipped == 2


def test_grey_transparent_and_palette_images_become_rgb(folder_dataset):
    clear = folder_dataset[_index_of(folder_dataset, "clear.png")]["pixel_values"]
    assert torch.allclose(clear, torch.ones_like(clear))  # composited on white
    grey = folder_dataset[_index_of(folder_dataset, "grey.png")]["pixel_values"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    palette = folder_dataset[_index_of(folder_dataset, "palette.gif")]["pixel_values"]
    assert palette.shape == (3, RES, RES)


def test_to_rgb_handles_every_common_mode():
    for mode in ("L", "LA", "RGBA", "P", "I;16", "CMYK", "1"):
        image = Image.new(mode, (4, 4))
        assert to_rgb(image).mode == "RGB"
    sixteen_bit = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen_bit)).min() == 255


def test_load_image_names_the_file_it_cannot_read(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.png"):
        load_image(str(bad))


def test_streaming_folder_drops_unreadable_files(image_folder, tmp_path):
    dataset = build_dataset(image_folder, resolution=RES, train=False, streaming=True, cache_dir=tmp_path)
    assert isinstance(dataset, torch.utils.data.IterableDataset)
    assert dataset.id2label == {0: "cat", 1: "dog"}
    with pytest.warns(RuntimeWarning):
        items = list(dataset)
    assert len(items) == 9 and dataset.num_skipped == 2
    assert all(item["pixel_values"].shape == (3, RES, RES) for item in items)
    # Counted in the items too, for DataLoader workers (a bad file after the last good one has no item to ride on).
    assert 1 <= sum(item["skipped"] for item in items) <= 2
    with pytest.warns(RuntimeWarning):
        shards = [[item["pixel_values"] for item in dataset.shard(rank, 2)] for rank in range(2)]
    assert len(shards[0]) + len(shards[1]) == 9 and shards[0] and shards[1]
    assert not any(torch.equal(a, b) for a in shards[0] for b in shards[1])  # the processes' parts differ


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_items_collate_into_batches(folder_dataset):
    batch = next(iter(torch.utils.data.DataLoader(folder_dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, RES, RES)
    assert batch["label"].dtype == torch.long


def _tiny_table(rng, labelled=True):
    images = []
    for _ in range(6):
        buffer = io.BytesIO()
        _random_rgb(rng, 20, 20).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    images[2] = {"bytes": b"garbage", "path": None}
    data = {"image": images}
    features = {"image": datasets.Image()}
    if labelled:
        data["label"] = [0, 1, 2, 0, 1, 2]
        features["label"] = datasets.ClassLabel(names=["a", "b", "c"])
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def test_saved_dataset_and_parquet_file_load_like_hub_datasets(tmp_path):
    table = _tiny_table(np.random.default_rng(1))
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "images.parquet"))
    for source in (tmp_path / "saved", tmp_path / "images.parquet"):
        dataset = build_dataset(source, resolution=RES, cache_dir=tmp_path / "cache")
        assert len(dataset) == 6 and dataset.id2label == {0: "a", 1: "b", 2: "c"}
        with pytest.warns(RuntimeWarning, match="in-memory image bytes"):
            item = dataset[2]
        assert item["label"] == 0 and dataset.num_skipped == 1  # index 3 stood in for index 2


def test_hub_names_go_to_load_dataset_with_split_and_streaming(monkeypatch):
    calls = []
    table = _tiny_table(np.random.default_rng(2))

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = build_dataset("someone/tiny-images", resolution=RES, split="validation")
    assert calls[0][0] == "someone/tiny-images"
    assert calls[0][1]["split"] == "validation" and calls[0][1]["streaming"] is False
    assert dataset.num_classes == 3 and dataset[0]["pixel_values"].shape == (3, RES, RES)


def test_hub_failures_and_bad_columns_explain_the_fix(monkeypatch):
    def unreachable(name, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match="someone/missing.*local image folder"):
        build_dataset("someone/missing", resolution=RES)

    table = _tiny_table(np.random.default_rng(3))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kwargs: table)
    with pytest.raises(ValueError, match="no column 'caption'"):
        build_dataset("someone/tiny", resolution=RES, label_column="caption")


def test_clear_errors_for_bad_sources_and_resolutions(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "nowhere", resolution=RES)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        build_dataset(tmp_path / "empty", resolution=RES)

    (tmp_path / "one" / "only").mkdir(parents=True)
    _random_rgb(np.random.default_rng(4), 20, 20).save(tmp_path / "one" / "only" / "a.png")
    _random_rgb(np.random.default_rng(5), 20, 20).save(tmp_path / "one" / "only" / "b.png")
    with pytest.raises(ValueError, match="at least two"):
        build_dataset(tmp_path / "one", resolution=RES, require_labels=True, cache_dir=tmp_path / "cache")
    unlabelled = build_dataset(tmp_path / "one", resolution=RES, cache_dir=tmp_path / "cache")
    assert unlabelled[0]["label"] == -1 and unlabelled.num_classes == 0

    for resolution in (0, -8, 3.5, "256", True, None):
        with pytest.raises(ValueError, match="positive int"):
            build_dataset("demo", resolution=resolution)


def test_demo_set_is_five_thousand_labelled_digits():
    dataset = build_dataset("demo", resolution=32, train=False)
    assert isinstance(dataset, DemoDataset) and len(dataset) == 5000
    assert dataset.id2label == {i: str(i) for i in range(10)} and dataset.num_classes == 10
    labels = dataset.labels()
    assert sorted(set(labels)) == list(range(10)) and labels.count(7) == 500
    item = dataset[1234]
    assert item["pixel_values"].shape == (3, 32, 32) and item["label"] == labels[1234]
    assert item["pixel_values"].min() == -1.0 and item["pixel_values"].max() > 0.5  # white digit on black
    assert build_dataset("demo", resolution=20)[0]["pixel_values"].shape == (3, 20, 20)


def test_train_transform_varies_and_eval_transform_does_not():
    torch.manual_seed(0)
    half = np.zeros((RES, RES, 3), dtype=np.uint8)
    half[:, RES // 2 :] = 255
    image = Image.fromarray(half)  # dark left, bright right

    crops = train_transform(RES, horizontal_flip=False)
    views = [crops(image) for _ in range(12)]
    assert all(view.shape == (3, RES, RES) for view in views)
    assert any(not torch.equal(views[0], view) for view in views[1:])  # random resize + crop

    flips = train_transform(RES)
    bright_left = [bool(view[:, :, 0].mean() > view[:, :, -1].mean()) for view in (flips(image) for _ in range(32))]
    assert any(bright_left) and not all(bright_left)  # both orientations appear

    evaluate = eval_transform(RES)
    photo = _random_rgb(np.random.default_rng(6), 30, 50)
    first, second = evaluate(photo), evaluate(photo)
    assert torch.equal(first, second) and first.shape == (3, RES, RES)


def test_huge_and_extreme_images_are_reduced_cheaply_before_resizing(tmp_path):
    """Issue 19, also seen: a 2 x 4000 px strip is cut to a sane aspect ratio, a big image box-reduced,
    before any resize, keeping the short side a transform needs."""
    from fullvq.data import MAX_ASPECT_RATIO, fit_image

    strip = fit_image(Image.new("RGB", (2, 4000)), side=320)
    assert strip.size == (2, int(2 * MAX_ASPECT_RATIO))
    big = fit_image(Image.new("RGB", (3000, 2000)), side=320)
    assert big.size == (500, 334) and min(big.size) >= 320  # reduced 6x (PIL rounds up)
    assert fit_image(Image.new("RGB", (500, 375)), side=320).size == (500, 375)  # ordinary photos untouched

    script = f"""
import resource, sys
from PIL import Image
from fullvq.data import build_dataset
Image.new("RGB", (2, 4000), (200, 10, 10)).save("{tmp_path}/a/strip.png")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
item = build_dataset("{tmp_path}/a", resolution=256, train=False)[0]
assert tuple(item["pixel_values"].shape) == (3, 256, 256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    (tmp_path / "a").mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 200  # MiB of extra peak memory (1,400 before the cut)
