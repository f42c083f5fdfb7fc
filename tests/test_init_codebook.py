"""VQGAN-LC codebook initialisation: k-means, patch features of real transformers encoders, the CLI."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fullvq.cli import main as cli_main  # noqa: E402
from fullvq.data import build_dataset  # noqa: E402
from fullvq.jobs.init_codebook import split_codes, stats_paths  # noqa: E402
from fullvq.tokenizer import build_quantizer  # noqa: E402
from fullvq.tokenizer.kmeans import kmeans  # noqa: E402
from fullvq.tokenizer.patch_features import PatchFeatureExtractor, pool_patches  # noqa: E402
from fullvq.tokenizer.patch_features import extract_patch_features as extract_features  # noqa: E402

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)


# --------------------------------------------------------------------------------------------
# k-means


def _planted(num_centres=8, per_centre=200, dim=16, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_centres, dim, generator=generator) * 10
    points = centres.repeat_interleave(per_centre, 0) + spread * torch.randn(num_centres * per_centre, dim,
                                                                          generator=generator)
    return centres, points[torch.randperm(len(points), generator=generator)]


def test_kmeans_recovers_well_separated_planted_centres():
    centres, points = _planted()
    result = kmeans(points, 8, init="k-means++", seed=0, progress=False)
    distance = torch.cdist(centres, result.centers)
    assert distance.min(dim=1).values.max() < 0.05  # every planted centre found
    assert sorted(result.cluster_sizes.tolist()) == [200] * 8
    assert result.inertia == pytest.approx(result.inertia_history[-1])


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_inertia_never_rises(init):
    points = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))
    result = kmeans(points, 40, init=init, num_iters=25, tol=0.0, seed=3, chunk_size=700, progress=False)
    history = result.inertia_history
    assert len(history) >= 5
    assert all(later <= earlier for earlier, later in zip(history, history[1:], strict=False))
    assert history[-1] < history[0]


def test_kmeans_is_deterministic_and_chunking_does_not_change_the_result():
    points = torch.randn(2000, 8, generator=torch.Generator().manual_seed(2))
    one = kmeans(points, 16, seed=7, chunk_size=2000, progress=False)
    two = kmeans(points, 16, seed=7, chunk_size=333, progress=False)
    assert torch.equal(one.centers, two.centers)
    assert not torch.equal(one.centers, kmeans(points, 16, seed=8, progress=False).centers)


def test_kmeans_reseeds_empty_clusters():
    # 60 copies of one point and four small far groups: random seeding picks duplicate centres,
    # whose twins end up empty and must move to the far groups.
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=generator) * 20
    groups = [centres[0].repeat(60, 1)] + [c + 0.1 * torch.randn(5, 8, generator=generator) for c in centres[1:]]
    result = kmeans(torch.cat(groups), 5, init="random", seed=0, tol=0.0, progress=False)
    assert result.num_reseeded > 0
    assert (result.cluster_sizes > 0).all()


def test_kmeans_runs_on_memory_mapped_features(tmp_path):
    _, points = _planted(num_centres=4, per_centre=50)
    mapped = np.lib.format.open_memmap(str(tmp_path / "features.npy"), mode="w+", dtype=np.float32,
                                       shape=tuple(points.shape))
    mapped[:] = points.numpy()
    from_disk = kmeans(torch.from_numpy(mapped), 4, seed=0, chunk_size=64, progress=False)
    in_memory = kmeans(points, 4, seed=0, chunk_size=64, progress=False)
    assert torch.equal(from_disk.centers, in_memory.centers)


def test_kmeans_refuses_more_clusters_than_features():
    with pytest.raises(ValueError, match="cannot make 11 clusters from 10 features"):
        kmeans(torch.randn(10, 4), 11, progress=False)


def test_split_codes_spreads_the_remainder():
    assert split_codes(100_000, 1000) == [100] * 1000
    assert split_codes(7, 3) == [3, 2, 2]


# --------------------------------------------------------------------------------------------
# Encoders


def _save(model, folder, processor=None):
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny randomly initialised CLIP vision tower with its image processor, saved to disk."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VIT)), folder, processor)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 40 x 48 images (stripes vs. blobs) and one unreadable file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("stripes", "blobs"):
        (root / name).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
            if name == "stripes":
                pixels[::4] = 230
            else:
                pixels[10:30, 12:36] = rng.integers(150, 255, 3, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "blobs" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_clip_patch_features_drop_the_class_token(clip_dir):
    extractor = PatchFeatureExtractor.from_pretrained(clip_dir)
    assert (extractor.image_size, extractor.grid_size, extractor.feature_dim) == (32, 4, 32)
    assert extractor.num_prefix_tokens == 1
    processor = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    assert extractor.mean.flatten().tolist() == pytest.approx(list(processor.image_mean))

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    features = extractor(images)
    assert features.shape == (2, 4, 4, 32)
    model = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
    normalized = ((images + 1) / 2 - extractor.mean) / extractor.std
    with torch.no_grad():
        reference = model(pixel_values=normalized).last_hidden_state[:, 1:].reshape(2, 4, 4, 32)
    torch.testing.assert_close(features, reference)

    larger = PatchFeatureExtractor.from_pretrained(clip_dir, image_size=48)  # interpolated positions
    assert larger.num_prefix_tokens == 1 and larger(torch.zeros(1, 3, 48, 48)).shape == (1, 6, 6, 32)

    pooled = pool_patches(features, 2)
    assert pooled.shape == (2, 2, 2, 32)
    torch.testing.assert_close(pooled[:, 0, 0], features[:, :2, :2].mean(dim=(1, 2)))


@pytest.mark.parametrize(
    "name, expected_prefix",
    [("dinov2_registers", 5), ("siglip", 0), ("vit", 1), ("clip_two_tower", 1)],
)
def test_prefix_tokens_follow_the_architecture(tmp_path, name, expected_prefix):
    if name == "dinov2_registers":
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**TINY_VIT, num_register_tokens=4))
    elif name == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_VIT))
    elif name == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT))
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=TINY_VIT, projection_dim=16,
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    folder = _save(model, tmp_path / name)  # no image processor: fallback statistics and config size
    extractor = PatchFeatureExtractor.from_pretrained(folder)
    assert extractor.num_prefix_tokens == expected_prefix
    assert extractor(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 32)
    if name == "clip_two_tower":
        assert extractor.mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
        projected = PatchFeatureExtractor.from_pretrained(folder, feature_space="projected")
        assert projected.feature_dim == 16 and projected(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 16)


def test_encoder_without_patch_tokens_is_refused(tmp_path):
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    with pytest.raises(ValueError, match="no patch tokens"):
        PatchFeatureExtractor.from_pretrained(_save(resnet, tmp_path / "resnet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PatchFeatureExtractor.from_pretrained(tmp_path / "missing_encoder")


def test_extract_features_writes_a_memory_map(clip_dir, image_folder, tmp_path):
    extractor = PatchFeatureExtractor.from_pretrained(clip_dir)
    dataset = build_dataset(image_folder, resolution=32, train=False, cache_dir=tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        features = extract_features(extractor, dataset, pool_factor=2, features_per_image=3,
                                    cache_path=tmp_path / "features.npy", batch_size=4, progress=False)
    assert features.shape == (8 * 3, 32)  # the unreadable image adds no rows
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "features.npy")[: 8 * 3]), features)


# --------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def run(tmp_path):
    """``fullvq init-codebook ARGS`` in-process, with a private datasets cache; returns the exit code."""

    def run_cli(*argv):
        return cli_main(["init-codebook", *map(str, argv), "--no-progress", "--cache-dir", str(tmp_path / "cache")])

    return run_cli


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cli_builds_a_codebook_that_trains_in_the_lc_quantizer(clip_dir, image_folder, tmp_path, capsys, run):
    out = tmp_path / "codebook.safetensors"
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 12, "--out", out, "--iters", 8) == 0
    assert "wrote" in capsys.readouterr().out

    codebook = load_file(out)["codebook"]
    assert codebook.shape == (12, 32) and codebook.dtype == torch.float32
    stats_json, stats_png = stats_paths(out)
    stats = json.loads(stats_json.read_text())
    assert stats["images"] == 8 and stats["features"] == 8 * 16 and stats["skipped_images"] == 1
    assert sum(stats["cluster_sizes"]["histogram"]["counts"]) == 12
    assert all(b <= a for a, b in zip(stats["inertia_history"], stats["inertia_history"][1:], strict=False))
    assert stats_png.stat().st_size > 0

    quantizer = build_quantizer("lc", codebook_size=12, codebook_dim=8, feature_dim=32)
    quantizer.load_codebook(out)
    assert torch.equal(quantizer.frozen_codebook, codebook)
    # The projector learns to map the frozen k-means codebook onto latents made from its codes by
    # an unknown linear map.
    generator = torch.Generator().manual_seed(0)
    target_map = torch.randn(32, 8, generator=generator) / codebook.norm(dim=1).mean()
    picks = torch.randint(12, (2 * 4 * 4,), generator=generator)
    latents = (codebook[picks] @ target_map).reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        output = quantizer(latents)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert torch.equal(quantizer.frozen_codebook, codebook)  # the table itself stays frozen


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cli_per_class_clustering_splits_codes_over_classes(clip_dir, image_folder, tmp_path, run):
    out = tmp_path / "per_class.safetensors"
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 6, "--out", out,
                "--per-class", "--pool-factor", 2, "--init", "random") == 0
    stats = json.loads(stats_paths(out)[0].read_text())
    assert stats["clustering"] == "per-class"
    assert stats["codes_per_class"] == {"blobs": 3, "stripes": 3}
    assert stats["features"] == 8 * 4  # 4 x 4 patch grid pooled 2x per side
    assert load_file(out)["codebook"].shape == (6, 32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cli_errors_name_the_problem_and_the_fix(clip_dir, image_folder, tmp_path, capsys, run):
    out = tmp_path / "codebook.safetensors"
    out.write_bytes(b"an older codebook")
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 4, "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 4, "--out", out, "--overwrite") == 0
    assert load_file(out)["codebook"].shape == (4, 32)

    fresh = tmp_path / "fresh.safetensors"
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 500, "--out", fresh) == 2
    assert "num_codes=500 is larger than the 144 features that 9 images give" in capsys.readouterr().err
    assert run("--encoder", clip_dir, "--data", image_folder, "--num-codes", 140, "--out", fresh) == 2
    assert "num_codes=140 is larger than the 128 features of the 8 readable images" in capsys.readouterr().err
    assert run("--encoder", clip_dir, "--data", tmp_path / "no_such_folder", "--num-codes", 4, "--out", fresh) == 2
    assert "does not exist" in capsys.readouterr().err
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    encoder = _save(resnet, tmp_path / "resnet")
    assert run("--encoder", encoder, "--data", image_folder, "--num-codes", 4, "--out", fresh) == 2
    assert "no patch tokens" in capsys.readouterr().err
    assert not fresh.exists()
