"""Stage two end to end: token caching (views, dtype, fingerprint, resume, 2 processes) and GPT
training on the cache (refusals, overfitting, the final model + pipeline folders)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fullvq import FVQModel
from fullvq.cards import read_card_facts
from fullvq.cli import main as cli_main
from fullvq.config import ConfigError, load_config
from fullvq.jobs.cache_tokens import AUGMENTATIONS, augmentation_views, cache_tokens
from fullvq.jobs.generator_stages import decay_groups
from fullvq.jobs.schedule import SeededItems
from fullvq.jobs.token_cache import CACHE_FILE, TokenCache, token_dtype
from fullvq.jobs.train_generator import AugmentedTokens, GeneratorTrainConfig, train_generator

REPO = Path(__file__).resolve().parents[1]
# 32 px -> 8 x 8 tokens over 64 codes; a random vq codebook already gives varied codes.
TOKENIZER = dict(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                 norm_num_groups=8, quantizer="vq", codebook_size=64, codebook_dim=8)
CLASSES = ["ant", "bee", "cat", "dog"]
TINY_GPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, class_dropout_prob=0.0,
                token_dropout_prob=0.0, residual_dropout_prob=0.0, ffn_dropout_prob=0.0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One image per class (non-square, so crops matter), a corrupt file, a saved tiny tokenizer and
    two caches of it: centre + flip in shards of 2 images, and centre only."""
    root = tmp_path_factory.mktemp("stage2")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / name / "0.png")
    (root / "images" / "cat" / "corrupt.png").write_bytes(b"\x89PNG not an image")
    torch.manual_seed(0)
    FVQModel(**TOKENIZER).save_pretrained(root / "tokenizer")
    with pytest.warns(RuntimeWarning, match="corrupt.png"):
        cache_tokens(root / "tokenizer", root / "images", root / "flip", augmentation="flip", shard_size=2,
                     batch_size=2, num_workers=0)
    cache_tokens(root / "tokenizer", root / "images", root / "centre", augmentation="none", num_workers=0)
    return root


def recipe(root: Path, cache: str = "centre", **overrides) -> dict:
    train = dict(output_dir=str(root / "run"), batch_size=4, max_steps=200, learning_rate=5e-3, scale_lr=False,
                 lr_schedule="cosine", warmup_steps=10, weight_decay=0.0, num_workers=0, log_every=20,
                 sample_every=200, checkpoint_every=200, tracker="none")
    train.update(overrides)
    return {"tokens": str(root / cache), "model": dict(TINY_GPT), "train": train, "num_samples": 4}


def write_recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_cache_holds_int16_codes_of_each_view_with_labels_and_the_tokenizer_fingerprint(workspace):
    cache = TokenCache(workspace / "flip")
    info = cache.info
    sha = hashlib.sha256((workspace / "tokenizer" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert info["tokenizer_sha256"] == sha and info["tokenizer"] == str((workspace / "tokenizer").resolve())
    assert info["codebook_size"] == 64 and info["grid"] == [8, 8] and info["resolution"] == 32
    assert info["augmentations"] == ["center", "center_flip"] and info["num_augmentations"] == 2
    assert info["id2label"] == dict(enumerate(CLASSES)) and info["dtype"] == "int16"
    assert info["count"] == 4 and info["num_skipped"] == 1 and info["shards"] == ["shard-00000", "shard-00001",
                                                                                   "shard-00002"]
    assert cache.table.features["tokens"].dtype == "int16"
    assert token_dtype(32768) == "int16" and token_dtype(32769) == "int32"

    tokenizer = FVQModel.from_pretrained(workspace / "tokenizer").eval()
    views = augmentation_views(32, "flip")
    assert sorted(cache.labels().tolist()) == [0, 1, 2, 3]
    for i in range(len(cache)):
        item = cache[i]
        assert item["tokens"].shape == (2, 64) and item["tokens"].dtype == torch.long
        image = Image.open(workspace / "images" / CLASSES[item["label"]] / "0.png").convert("RGB")
        expected = tokenizer.encode_indices(views(image)).flatten(1)
        assert torch.equal(item["tokens"], expected)
        assert not torch.equal(item["tokens"][0], item["tokens"][1])  # the mirror image has other codes
    # The centre-only cache holds the same centre view.
    centre = TokenCache(workspace / "centre")
    assert centre.num_augmentations == 1
    assert all(torch.equal(centre[i]["tokens"][0], cache[i]["tokens"][0]) for i in range(len(cache)))


def test_ten_crop_gives_ten_views_whose_last_five_mirror_the_first_five():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    views = augmentation_views(40, "ten-crop")(image)  # 1.1 x 40 = 44: an even margin keeps the centre exact
    assert views.shape == (10, 3, 40, 40) and len(AUGMENTATIONS["ten-crop"]) == 10
    assert views.min() >= -1 and views.max() <= 1
    torch.testing.assert_close(views[9], views[4].flip(-1))  # centre
    torch.testing.assert_close(views[5], views[1].flip(-1))  # top-left of the mirror = mirrored top-right
    assert not torch.allclose(views[0], views[1])


def test_rerun_keeps_finished_shards_rewrites_missing_ones_and_refuses_other_settings(workspace, tmp_path, capsys):
    output = tmp_path / "cache"
    command = ["cache-tokens", "--tokenizer", str(workspace / "tokenizer"), "--source", str(workspace / "images"),
               "--output", str(output), "--shard-size", "2", "--num-workers", "0", "--augmentation", "flip"]
    with pytest.warns(RuntimeWarning):
        assert cli_main(command) == 0
    first = TokenCache(output)
    stamps = [(output / f"shard-0000{n}" / "state.json").stat().st_mtime_ns for n in (0, 2)]
    # A run killed mid-way: a shard half-written (only its temporary folder), the json not yet final.
    import shutil

    shutil.rmtree(output / "shard-00001")
    shutil.copytree(output / "shard-00000", output / ".tmp-shard-00001")
    info = json.loads((output / CACHE_FILE).read_text())
    (output / CACHE_FILE).write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(ConfigError, match="unfinished.*re-run"):
        TokenCache(output)
    with pytest.warns(RuntimeWarning, match="corrupt.png"):  # shard 1 (cat/0.png, cat/corrupt.png) again
        assert cli_main(command) == 0
    assert [(output / f"shard-0000{n}" / "state.json").stat().st_mtime_ns for n in (0, 2)] == stamps
    again = TokenCache(output)
    assert again.info == first.info and not list(output.glob(".tmp-*"))
    assert all(torch.equal(again[i]["tokens"], first[i]["tokens"]) for i in range(len(first)))
    assert cli_main(command[:-1] + ["ten-crop"]) == 2
    assert "holds tokens made with other settings (augmentation: 'flip' -> 'ten-crop'" in capsys.readouterr().err


def test_a_second_cache_tokens_into_a_busy_folder_is_refused_and_shard_writes_are_idempotent(workspace, tmp_path,
                                                                                             capsys):
    """Issue 19, class 10: two cache-tokens runs never write one folder; a finished shard is never rewritten."""
    from fullvq.jobs.cache_tokens import _write_shard

    output = tmp_path / "cache"
    command = ["cache-tokens", "--tokenizer", str(workspace / "tokenizer"), "--data", str(workspace / "images"),
               "--output", str(output), "--num-workers", "0", "--augmentation", "none"]
    with pytest.warns(RuntimeWarning):
        assert cli_main(command) == 0
    shard = output / "shard-00000"
    before = {p.name: p.stat().st_mtime_ns for p in shard.iterdir()}
    _write_shard(shard, np.zeros((1, 1, 64), dtype=np.int16), [0], [0], "int16", 0, 0)  # a late second writer
    assert {p.name: p.stat().st_mtime_ns for p in shard.iterdir()} == before
    assert len(TokenCache(output)) == 4 and not list(output.glob(".tmp-*"))

    from fullvq.io import hold_folder

    with hold_folder(tmp_path / "busy", "another cache-tokens"):
        assert cli_main(command[:-5] + [str(tmp_path / "busy")] + command[-4:]) == 2
        err = capsys.readouterr().err
        assert f"PID {os.getpid()}" in err and "in use" in err
        assert [p.name for p in (tmp_path / "busy").iterdir()] == [".fullvq.lock"]


def test_cache_tokens_limit_below_one_is_refused_before_any_work(workspace, tmp_path, capsys):
    """Issue 19, class 14."""
    for limit in ("0", "-3"):
        assert cli_main(["cache-tokens", "--tokenizer", str(workspace / "tokenizer"), "--data",
                         str(workspace / "images"), "--output", str(tmp_path / "cache"), "--max-images", limit]) == 2
        assert f"limit={limit}" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_two_processes_write_their_own_shards_and_match_one_process(workspace, tmp_path):
    output = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", MASTER_PORT="29533")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", "-m", "fullvq.cli", "cache-tokens", "--tokenizer", str(workspace / "tokenizer"),
               "--source", str(workspace / "images"), "--output", str(output), "--shard-size", "1",
               "--num-workers", "0"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = TokenCache(output), TokenCache(workspace / "flip")
    assert two.info["shards"] == [f"shard-{n:05d}" for n in range(5)] and two.info["num_skipped"] == 1
    writers = [json.loads((output / name / "fullvq_shard.json").read_text())["process_index"]
               for name in two.info["shards"]]
    assert writers == [0, 1, 0, 1, 0]  # shard n by process n % 2
    by_index = {one[i]["index"]: one[i] for i in range(len(one))}
    for i in range(len(two)):
        item = two[i]
        assert torch.equal(item["tokens"], by_index[item["index"]]["tokens"])
        assert item["label"] == by_index[item["index"]]["label"]


def test_each_step_draws_one_cached_view_per_image_reproducibly(workspace):
    cache = TokenCache(workspace / "flip")
    items = SeededItems(AugmentedTokens(cache), seed=0)
    seen = set()
    for epoch in range(8):
        items.epoch = epoch
        item = items[0]
        view = [torch.equal(item["tokens"], cache[0]["tokens"][v]) for v in range(2)].index(True)
        assert torch.equal(items[0]["tokens"], item["tokens"])  # same seed, epoch and index: same view
        seen.add(view)
    assert seen == {0, 1}


def test_training_refuses_other_tokenizers_codebooks_grids_and_labels_before_any_work(workspace, tmp_path):
    base = recipe(workspace, output_dir=str(tmp_path / "run"))

    def refused(values, *overrides, match):
        config = load_config(GeneratorTrainConfig, write_recipe(tmp_path / "bad.yaml", values), list(overrides))
        with pytest.raises(ConfigError, match=match):
            train_generator(config)

    refused(base, "model.codebook_size=128", match=r"model.codebook_size=128 contradicts .* codebook_size=64")
    refused(base, "model.grid_size=4", match=r"model.grid_size=\[4, 4\] contradicts .* grid_size=\[8, 8\]")
    refused(base, "model.num_classes=3", match=r"class label 3, outside \[0, 3\)")
    torch.manual_seed(1)
    FVQModel(**TOKENIZER).save_pretrained(tmp_path / "other")
    refused(base, f"tokenizer={tmp_path / 'other'}", match="made with another tokenizer.*re-run fullvq cache-tokens")
    # A cache whose record says another codebook size than its (same-hash) tokenizer has.
    import shutil

    shutil.copytree(workspace / "centre", tmp_path / "edited")
    info = json.loads((tmp_path / "edited" / CACHE_FILE).read_text())
    (tmp_path / "edited" / CACHE_FILE).write_text(json.dumps({**info, "codebook_size": 128}))
    refused(base, f"tokens={tmp_path / 'edited'}", match="codebook_size=64 but the token cache .* says 128")
    with pytest.raises(ConfigError, match="not a token cache"):
        load_config(GeneratorTrainConfig, write_recipe(tmp_path / "bad.yaml", base), [f"tokens={tmp_path}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hidden_sise'.*hidden_size"):
        load_config(GeneratorTrainConfig, write_recipe(tmp_path / "bad.yaml", base), ["model.hidden_sise=8"])
    with pytest.raises(ConfigError, match="model.size='M' is not one of"):
        load_config(GeneratorTrainConfig, write_recipe(tmp_path / "bad.yaml", base), ["model.size=M"])
    assert not (tmp_path / "run").exists()


def test_tiny_gpt_overfits_cached_grids_and_samples_them_back_for_their_classes(workspace, tmp_path, capsys):
    from fullvq.generator import FullVQGPT, sample
    from fullvq.pipelines.autoregressive import FullVQPipeline

    config = load_config(GeneratorTrainConfig, write_recipe(tmp_path / "r.yaml", recipe(workspace)),
                         [f"train.output_dir={tmp_path / 'run'}"])
    assert config.train.reference_batch_size == 256 and config.train.adam_beta2 == 0.95
    summary = train_generator(config)
    run = tmp_path / "run"
    assert f"wrote {run / 'pipeline'}: fullvq sample" in capsys.readouterr().out  # where the user goes next
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 200 and records[-1]["loss"] < 0.01 and records[-1]["token_accuracy"] == 1.0
    assert (run / "samples" / "step-200.png").is_file() and (run / "model" / "train_config.yaml").is_file()
    # Both written folders carry a Hub card naming what they are and how they were made.
    for folder, kind in ((run / "pipeline", "pipeline"), (run / "model", "gpt")):
        card = read_card_facts(folder)
        assert card["kind"] == kind and card["recipe"]["train"]["max_steps"] == 200, folder

    cache = TokenCache(workspace / "centre")
    grids = {cache[i]["label"]: cache[i]["tokens"][0] for i in range(len(cache))}
    labels = sorted(grids)
    expected = torch.stack([grids[label] for label in labels])
    gpt = FullVQGPT.from_pretrained(run / "model")
    assert (gpt.config.codebook_size, gpt.config.grid_size, gpt.config.num_classes) == (64, [8, 8], 4)
    assert torch.equal(sample(gpt, labels, temperature=0.0), expected)
    assert torch.equal(sample(gpt, labels, temperature=1e-4, generator=torch.Generator().manual_seed(0)), expected)

    pipe = FullVQPipeline.from_pretrained(run / "pipeline")
    assert pipe.labels == {name: i for i, name in enumerate(CLASSES)}
    images = pipe(class_labels=["ant", "bee", "cat", "dog"], guidance_scale=1.0, temperature=0.0,
                  output_type="pt").images
    tokenizer = FVQModel.from_pretrained(workspace / "tokenizer").eval()
    decoded = (tokenizer.decode_indices(expected.view(4, 8, 8)) + 1) / 2
    torch.testing.assert_close(images, decoded.clamp(0, 1), rtol=0, atol=1e-5)


def test_gpt_decays_matrices_and_embeddings_but_not_norms():
    from fullvq.generator import FullVQGPT, FullVQGPTConfig

    model = FullVQGPT(FullVQGPTConfig(codebook_size=16, num_classes=2, grid_size=2, **TINY_GPT))
    decay, no_decay = decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is model.class_embedding.weight for p in decay["params"])
    assert any(p is model.model.norm.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
