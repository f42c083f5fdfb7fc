"""benchmarks/codebook_scaling.py end to end at toy size: both offline sets, held-out splits that
never overlap the training pixels, one row per (set, quantizer, K, seed) with figures that can fail,
a token budget that scales with K, sets refused when too small to show usage, and the GPU preset's
path at CPU size."""

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
        assert "slot_usage_min_percent" not in row  # fvq's G is 1 below 4,096 codes: no code slots
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
    assert len(ablation) == 1 and ablation[0]["fvq_options"] == {"recover_std": 0.0}
    run = tmp_path / "runs" / "digits-32px-first60" / "fvq-16-3steps-bs4-seed0-recover-std-0.0"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["quantizer_kwargs"]["recover_std"] == 0.0
    assert (tmp_path / "ablation.md").is_file()
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 8


def test_tokens_per_code_sets_the_steps_from_the_codebook_size_batch_and_tokens_per_image():
    bench = load_benchmark()
    assert bench.tokens_per_image(32, (16, 32, 32)) == 64 and bench.tokens_per_image(64, (16, 32, 32)) == 256
    # 100 tokens per code at K = 65,536, batch 24 of 16 x 16 tokens: 6,553,600 / 6,144 = 1,066.7 -> 1,067 steps.
    assert bench.steps_for(100, 65536, 24, 256) == 1067
    assert bench.steps_for(100, 4 * 65536, 24, 256) == 4 * 1067 - 1  # 4,266.7 -> 4,267: scales with K
    assert bench.steps_for(0.001, 16, 24, 64) == 1


def test_the_64px_photo_set_can_show_99_percent_of_every_k_and_too_small_sets_are_refused_before_any_work(tmp_path):
    bench = load_benchmark()
    for size in (65536, 262144, 1048576):
        counts = bench.photo_counts_for(size, 256, 99.0)
        assert bench.uniform_ceiling(sum(counts) * 256, size) >= 99.0
        assert bench.uniform_ceiling((sum(counts) - 500) * 256, size) < 99.0 or counts == bench.DEFAULT_PHOTOS
    assert bench.photo_counts_for(16384, 64, 99.0) == (4500, 1000)  # the default run's set is unchanged
    assert bench.photo_counts_for(1048576, 256, 99.0) == (18000, 1000)
    # 5,000 digits at 64 px hold 1.28 M tokens: enough for 262,144 codes, not for 1,048,576.
    assert not bench.check_ceilings(["digits"], [262144], 256, (0, 0), None, 99.0)
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--datasets", "digits", "--sizes", "1048576", "--resolution", "64"])
    assert not any(tmp_path.iterdir())  # refused before writing anything
    problem = bench.check_ceilings(["digits"], [1048576], 256, (0, 0), None, 99.0)
    assert len(problem) == 1 and "70." in problem[0] and "--datasets photos" in problem[0]


def test_seeds_are_aggregated_into_mean_and_sample_sd_per_setting(tmp_path):
    bench = load_benchmark()
    rows = []
    for seed, usage in enumerate((90.0, 94.0, 98.0)):
        rows.append({"dataset": "photos", "quantizer": "fvq", "codebook_size": 65536, "seed": seed, "tokens": 10,
                     "tokens_all": 100, "uniform_ceiling_all_percent": 99.9, "usage_percent": usage - 10,
                     "usage_all_percent": usage, "perplexity": 1000.0 + seed, "psnr_db": 25.0, "rfid": 50.0})
    rows.append({**rows[0], "quantizer": "simvq", "usage_all_percent": 40.0})
    summary = bench.aggregate(rows)
    fvq, simvq = summary
    assert fvq["seeds"] == [0, 1, 2] and fvq["usage_all_percent"] == pytest.approx(94.0)
    assert fvq["usage_all_percent_sd"] == pytest.approx(4.0) and fvq["psnr_db_sd"] == 0.0
    assert simvq["seeds"] == [0] and simvq["usage_all_percent"] == 40.0 and simvq["usage_all_percent_sd"] == 0.0
    table = bench.write_table(summary, tmp_path / "t.md").splitlines()
    assert "94.0 ± 4.0 (100)" in table[2] and "| 3 |" in table[2]
    assert "40.0 (100)" in table[3] and "±" not in table[3]


def test_gpu_preset_smoke_runs_its_path_on_a_cpu_at_tiny_sizes(tmp_path, inception_weights):
    bench = load_benchmark()
    args = ["--preset", "gpu-large", "--smoke", "--out", str(tmp_path), "--inception-weights", str(inception_weights),
            "--sizes", "64", "--seeds", "0", "1", "--fvq-options", "group_size=4"]
    rows = bench.main(args)
    assert [(r["quantizer"], r["codebook_size"], r["seed"]) for r in rows] == [("fvq", 64, 0), ("fvq", 64, 1)]
    for row in rows:  # 64 px photos: 16 x 16 tokens an image; steps from 100 tokens per code at batch 4
        assert row["dataset"] == "photos" and row["resolution"] == 64 and row["batch_size"] == 4
        assert row["steps"] == bench.steps_for(100, row["codebook_size"], 4, 256)
        assert row["tokens_per_code"] >= 100 and row["tokens"] == 8 * 256 and row["tokens_all"] == 32 * 256
        assert row["fvq_options"] == {"group_size": 4}
        assert 0 <= row["slot_usage_min_percent"] <= row["slot_usage_median_percent"] <= 100
    assert rows[0]["psnr_db"] != rows[1]["psnr_db"]  # the seeds train differently
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert len(report["runs"]) == 2 and [r["seeds"] for r in report["summary"]] == [[0, 1]]
    assert (tmp_path / "smoke.md").read_text().count("±") >= 4 and (tmp_path / "smoke.png").is_file()
