"""The DiT / flow-matching head on tokenizer latents: objectives, guidance, the pipeline and the
``train-generator`` head selection."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

from fullvq import FVQModel
from fullvq.cli import main as cli_main
from fullvq.config import ConfigError, load_config
from fullvq.generator.latent_flow import (
    build_transformer,
    diffusion_loss,
    disable_internal_label_dropout,
    guided_prediction,
    sample_latents,
    sampling_scheduler,
)
from fullvq.jobs.cache_tokens import cache_tokens
from fullvq.jobs.generator_stages import latent_statistics
from fullvq.jobs.token_cache import CODEBOOK_FILE, TokenCache
from fullvq.jobs.train_generator import GeneratorTrainConfig
from fullvq.pipelines import LatentFlowPipeline, load_pipeline

# 32 px -> 8 x 8 grid of 8-dim codes.
TOKENIZER = dict(sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                 norm_num_groups=8, quantizer="vq", codebook_size=64, codebook_dim=8)
TINY_DIT = dict(patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=16)
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return FVQModel(**TOKENIZER).eval()


def tiny_transformer(num_classes: int = 2, **changes):
    torch.manual_seed(0)
    return build_transformer(latent_channels=8, grid_size=8, num_classes=num_classes, **{**TINY_DIT, **changes})


def test_flow_model_overfits_a_few_latents_and_samples_them_back(tokenizer):
    """Two classes, one latent grid each (codes of random indices): after training, sampling each
    class and snapping to the nearest codes gives back that class's indices."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 64, (2, 8, 8), generator=generator)
    with torch.no_grad():
        codes = tokenizer.quantize.lookup(targets)  # (2, 8, 8, 8)
    mean, std = codes.mean((0, 2, 3)), codes.std((0, 2, 3))
    latents = (codes - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    model = tiny_transformer(attention_head_dim=32)
    disable_internal_label_dropout(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    labels = torch.tensor([0, 1] * 8)
    for _ in range(400):
        loss = diffusion_loss(model, "flow", latents[labels], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe = LatentFlowPipeline(tokenizer, model.eval(), sampling_scheduler("flow"), latent_mean=mean.tolist(),
                              latent_std=std.tolist())
    sampled = sample_latents(model, pipe.scheduler, torch.tensor([0, 1, 1, 0]), num_inference_steps=25,
                             guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    snapped = pipe.snap(pipe.denormalize(sampled))
    assert torch.equal(snapped, targets[[0, 1, 1, 0]])
    # The pipeline decodes exactly those codes when asked to snap.
    images = pipe([0, 1], guidance_scale=1.0, num_inference_steps=25, snap_to_codebook=True, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images
    with torch.no_grad():
        expected = ((tokenizer.decode_indices(targets) + 1) / 2).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-5)


def test_guidance_scale_one_is_conditional_and_other_scales_mix_both_passes():
    model = tiny_transformer().eval()
    torch.manual_seed(1)
    for block in model.transformer_blocks:  # adaLN-zero starts at zero: give the labels some effect
        torch.nn.init.normal_(block.norm1.linear.weight, std=0.2)
    torch.nn.init.normal_(model.proj_out_2.weight, std=0.2)
    x, t, labels = torch.randn(3, 8, 8, 8), torch.tensor(500.0), torch.tensor([0, 1, 0])
    with torch.no_grad():
        conditional = model(x, timestep=t.repeat(3), class_labels=labels).sample
        unconditional = model(x, timestep=t.repeat(3), class_labels=torch.full_like(labels, 2)).sample
        assert torch.equal(guided_prediction(model, x, t, labels, 1.0), conditional)
        guided = guided_prediction(model, x, t, labels, 3.0)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_cfg_one_sampling_equals_a_plain_conditional_euler_loop():
    model = tiny_transformer().eval()
    scheduler = sampling_scheduler("flow")
    labels = torch.tensor([1, 0])
    got = sample_latents(model, scheduler, labels, num_inference_steps=6, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            velocity = model(x, timestep=t.repeat(2), class_labels=labels).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    assert torch.allclose(got, x, atol=1e-5)


def test_pipeline_round_trip_keeps_images_statistics_labels_and_scheduler(tmp_path, tokenizer):
    pipe = LatentFlowPipeline(tokenizer, tiny_transformer(3).eval(), sampling_scheduler("ddpm"),
                              id2label=dict(enumerate(CLASSES)), latent_mean=[0.1] * 8, latent_std=[2.0] * 8)
    first = pipe(["bee", 2], guidance_scale=2.0, num_inference_steps=4, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["fullvq_classes", "LatentFlowPipeline"] and index["scheduler"][1] == "DDIMScheduler"
    loaded = load_pipeline(tmp_path / "pipe")
    assert isinstance(loaded, LatentFlowPipeline) and isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.config.latent_std == [2.0] * 8 and loaded.labels == {"ant": 0, "bee": 1, "cat": 2}
    again = loaded(["bee", 2], guidance_scale=2.0, num_inference_steps=4, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert first.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(again, first, atol=1e-5)
    # Any DDPM-family sampler built from the same config drives the epsilon model, e.g. DPM-Solver++.
    loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
    solver = loaded([0], num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert solver.shape == (1, 32, 32, 3) and np.isfinite(solver).all()


def test_pipeline_refuses_mismatched_components_and_bad_calls(tokenizer):
    with pytest.raises(ValueError, match="in_channels=out_channels=8"):
        LatentFlowPipeline(tokenizer, build_transformer(latent_channels=4, grid_size=8, num_classes=2, **TINY_DIT),
                           sampling_scheduler("flow"))
    with pytest.raises(ValueError, match="sample_size=8"):
        LatentFlowPipeline(tokenizer, build_transformer(latent_channels=8, grid_size=4, num_classes=2, **TINY_DIT),
                           sampling_scheduler("flow"))
    with pytest.raises(ValueError, match="8 values"):
        LatentFlowPipeline(tokenizer, tiny_transformer(), sampling_scheduler("flow"), latent_std=[1.0])
    with pytest.raises(ValueError, match="patch_size=3 does not divide"):
        build_transformer(latent_channels=8, grid_size=8, num_classes=2, patch_size=3)
    pipe = LatentFlowPipeline(tokenizer, tiny_transformer(), sampling_scheduler("flow"))
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        pipe([5], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe([0], num_inference_steps=0)


# ----------------------------------------------------------------------------- train-generator heads


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    FVQModel(**TOKENIZER).save_pretrained(root / "tokenizer")
    cache_tokens(root / "tokenizer", root / "images", root / "ids", augmentation="none", num_workers=0)
    cache_tokens(root / "tokenizer", root / "images", root / "latents", augmentation="flip", num_workers=0,
                 latents=True)
    return root


def recipe(root: Path, head: str, cache: str = "latents", **train) -> dict:
    settings = dict(output_dir=str(root / f"run-{head}"), batch_size=4, max_steps=6, learning_rate=1e-3,
                    scale_lr=False, lr_schedule="constant", warmup_steps=1, weight_decay=0.0, num_workers=0,
                    log_every=3, sample_every=6, checkpoint_every=6, tracker="none")
    settings.update(train)
    return {"head": head, "tokens": str(root / cache), "model": dict(TINY_DIT), "train": settings,
            "num_samples": 3, "sample_num_inference_steps": 3}


def test_latents_cache_stores_the_tokenizer_codebook_and_exact_statistics(latent_cache):
    cache = TokenCache(latent_cache / "latents")
    tokenizer = FVQModel.from_pretrained(str(latent_cache / "tokenizer"))
    codebook = cache.codebook()
    assert cache.info["latents"] == {"codebook": CODEBOOK_FILE, "codebook_dim": 8}
    assert torch.equal(codebook, tokenizer.quantize.codebook().detach())
    codes = torch.cat([codebook[cache[i]["tokens"].reshape(-1)] for i in range(len(cache))]).double()
    mean, std = latent_statistics(cache, codebook)
    np.testing.assert_allclose(mean, codes.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(std, codes.std(0, unbiased=False).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="--latents"):
        TokenCache(latent_cache / "ids").codebook()


@pytest.mark.parametrize("head, scheduler", [("flow", FlowMatchEulerDiscreteScheduler), ("dit", DDIMScheduler)])
def test_train_generator_picks_the_head_from_the_config_and_writes_a_latent_pipeline(latent_cache, head, scheduler):
    path = latent_cache / f"{head}.yaml"
    path.write_text(yaml.safe_dump(recipe(latent_cache, head)))
    assert cli_main(["train-generator", str(path)]) == 0
    run = latent_cache / f"run-{head}"
    assert (run / "model" / "config.json").is_file() and (run / "samples" / "step-6.png").is_file()
    pipe = load_pipeline(run / "pipeline")
    assert isinstance(pipe, LatentFlowPipeline) and isinstance(pipe.scheduler, scheduler)
    assert pipe.transformer.config.num_embeds_ada_norm == 3 and pipe.labels["cat"] == 2
    images = pipe(["ant", "cat"], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses))


def test_dit_recipes_are_checked_before_training(latent_cache):
    def config(**changes):
        values = recipe(latent_cache, "flow")
        values.update(changes)
        return values

    with pytest.raises(ConfigError, match="head"):
        load_config(GeneratorTrainConfig, _write(latent_cache / "bad-head.yaml", config(head="diffusion")), [])
    with pytest.raises(ConfigError, match="model.sample_size is taken from the token cache"):
        load_config(GeneratorTrainConfig, _write(latent_cache / "bad.yaml", config()), ["model.sample_size=4"])
    with pytest.raises(ConfigError, match="unknown config key 'model.hidden_size'"):
        load_config(GeneratorTrainConfig, _write(latent_cache / "bad.yaml", config()), ["model.hidden_size=4"])
    with pytest.raises(ConfigError, match="model.size='XXL' is not one of"):
        load_config(GeneratorTrainConfig, _write(latent_cache / "bad.yaml", config()), ["model.size=XXL"])
    from fullvq.jobs.train_generator import train_generator

    ids_only = load_config(GeneratorTrainConfig, _write(latent_cache / "ids.yaml", recipe(latent_cache, "flow", "ids")),
                           [])
    with pytest.raises(ConfigError, match="--latents"):
        train_generator(ids_only)
    bad_patch = load_config(GeneratorTrainConfig, _write(latent_cache / "patch.yaml", config()),
                            ["model.patch_size=3", f"train.output_dir={latent_cache / 'run-bad-patch'}"])
    with pytest.raises(ConfigError, match="patch_size=3 does not divide"):
        train_generator(bad_patch)


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_sample_cli_and_gfid_sampling_drive_a_latent_pipeline(tmp_path, tokenizer):
    from fullvq.jobs.eval_generation import SETTINGS_NAME, generate_samples

    pipe = LatentFlowPipeline(tokenizer, tiny_transformer(3).eval(), sampling_scheduler("flow"),
                              id2label=dict(enumerate(CLASSES)))
    pipe.save_pretrained(tmp_path / "pipe")
    assert cli_main(["sample", str(tmp_path / "pipe"), "--labels", "cat", "0", "--num-inference-steps", "3",
                     "--snap-to-codebook", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "2_0.png").is_file() and (tmp_path / "out" / "grid.png").is_file()
    assert cli_main(["sample", str(tmp_path / "pipe"), "--labels", "0", "--temperature", "0.5",
                     "--out", str(tmp_path / "refused")]) == 2
    paths, kept = generate_samples(pipe, tmp_path / "samples", classes=[0, 2], images_per_class=2, batch_size=2,
                                   num_inference_steps=3, snap_to_codebook=True)
    assert kept == 0 and all(path.is_file() for path in paths)
    images = [np.asarray(Image.open(path)) for path in paths]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(images[0], images[2])
    assert not (tmp_path / "samples" / SETTINGS_NAME).exists()  # written by evaluate_generation, not here


@pytest.mark.parametrize("recipe_path", sorted((Path(__file__).resolve().parents[1] / "configs" / "generator")
                                               .glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_generator_recipe_is_valid(recipe_path, tmp_path):
    from fullvq.generator.gpt import FullVQGPTConfig
    from fullvq.jobs.token_cache import CACHE_FILE

    (tmp_path / CACHE_FILE).write_text("{}")  # the recipe's checks need only the cache's presence
    config = load_config(GeneratorTrainConfig, recipe_path, [f"tokens={tmp_path}"])
    settings = dict(config.model)
    size = settings.pop("size", None)
    if config.head == "gpt":
        gpt = FullVQGPTConfig.from_size(size, codebook_size=16384, grid_size=[16, 16], num_classes=1000,
                                        **settings) if size else FullVQGPTConfig(**settings)
        assert gpt.hidden_size > 0
        return
    with torch.device("meta"):  # the real architecture, not allocated
        model = build_transformer(latent_channels=256, grid_size=16, num_classes=1000, size=size, **settings)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert width == {"XL": 1152, None: 128}[size]
