"""benchmarks/codebook_scaling.py end to end at toy size: both offline sets, held-out splits that
never overlap the training pixels, one row per (set, quantizer, K) with figures that can fail."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fullvq.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("codebook_scaling", REPO / "benchmarks" / "codebook_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception-fid.pth"
    assert cli_main(["eval", "convert-inception", "--output", str(path)]) == 0
    return path


def test_photo_crops_are_32px_colour_and_held_out_ones_come_from_unseen_pixels(tmp_path):
    bench = load_benchmark()
    folder = bench.prepare_dataset("photos", tmp_path, 32, 0, (30, 10))
    train = sorted((folder / "train" / "photo").glob("*.png"))
    held_out = sorted((folder / "validation" / "photo").glob("*.png"))
    assert len(train) == 30 and len(held_out) == 10
    crops = [np.asarray(Image.open(path)) for path in train + held_out]
    assert all(crop.shape == (32, 32, 3) for crop in crops)
    assert np.std([crop.std(axis=(0, 1)).mean() for crop in crops]) > 0  # colour photos, not blank tiles
    train_bytes = {np.asarray(Image.open(path)).tobytes() for path in train}
    assert not any(np.asarray(Image.open(path)).tobytes() in train_bytes for path in held_out)


def test_benchmark_writes_one_row_per_run_a_table_and_a_plot_and_reuses_finished_runs(tmp_path, inception_weights):
    bench = load_benchmark()
    args = ["--out", str(tmp_path), "--quantizers", "vq", "fvq", "--sizes", "16", "64", "--steps", "3",
            "--batch-size", "4", "--fid-images", "6", "--photo-images", "24", "8", "--digits-limit", "60",
            "--workers", "1", "--inception-weights", str(inception_weights)]
    rows = bench.main(args)
    assert {(r["dataset"], r["quantizer"], r["codebook_size"]) for r in rows} == {
        (d, q, k) for d in ("digits", "photos") for q in ("vq", "fvq") for k in (16, 64)}
    for row in rows:
        held_out_images = 6 if row["dataset"] == "digits" else 8  # every 10th of 60 digits; 8 crops
        assert row["held_out_images"] == held_out_images and row["tokens"] == held_out_images * 64
        assert 0 < row["usage_percent"] <= row["usage_all_percent"] <= 100
        assert row["tokens_all"] > row["tokens"] and 1 <= row["perplexity"] <= row["codebook_size"]
        assert 0 < row["uniform_ceiling_percent"] <= 100 and row["rfid"] > 0 and 0 < row["psnr_db"] < 60
        assert row["fid_images"] == 6
    summary = json.loads((tmp_path / "results.json").read_text())
    assert len(summary["runs"]) == 8 and summary["settings"]["steps"] == 3
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 8 and "usage % (held-out tokens)" in table[0]
    assert (tmp_path / "results.png").stat().st_size > 10_000
    again = bench.main(args)  # every run is read back from its result.json
    assert again == rows
    # An fvq ablation keeps its own runs and files, and its setting reaches the model.
    ablation = bench.main(args[:2] + ["--datasets", "digits", "--quantizers", "fvq", "--sizes", "16",
                                      "--recover-std", "0", "--results-name", "ablation"] + args[8:])
    assert len(ablation) == 1 and ablation[0]["recover_std"] == 0.0
    config = json.loads((tmp_path / "runs" / "digits" / "fvq-16-recover-std-0" / "model" / "config.json").read_text())
    assert config["quantizer_kwargs"]["recover_std"] == 0.0
    assert (tmp_path / "ablation.md").is_file()
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 8
