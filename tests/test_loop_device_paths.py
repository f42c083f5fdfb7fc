"""The training loop's GPU switches and GPU-path changes, checked on the CPU: each switch gives the
eager path's result, the EMA is diffusers' EMAModel without its temporary copy, workers persist."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fullvq.config import load_config
from fullvq.jobs.ema import ExponentialMovingAverage
from fullvq.jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer


def image_folder(root, count: int = 8):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


def run(tmp_path, images, name: str, **train) -> tuple[list[float], list[dict]]:
    """A tiny fvq tokenizer with the GAN, 2 epochs of 2 steps; its parameter checksum and logs."""
    settings = dict(output_dir=str(tmp_path / name), batch_size=4, max_steps=4, learning_rate=1e-3, scale_lr=False,
                    warmup_steps=0, num_workers=0, log_every=1, sample_every=100, checkpoint_every=100,
                    tracker="none")
    settings.update(train)
    recipe = {"model": dict(sample_size=32, block_out_channels=[16, 32], layers_per_block=1, latent_channels=16,
                            norm_num_groups=8, quantizer="fvq", codebook_size=64, codebook_dim=8),
              "loss": {"perceptual_weight": 0.0, "gan_weight": 0.5, "gan_start_step": 0,
                       "discriminator_channels": 8},
              "data": {"source": str(images), "resolution": 32}, "train": settings}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    summary = train_tokenizer(load_config(TokenizerTrainConfig, tmp_path / f"{name}.yaml"))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary["parameter_checksums"], records


@pytest.fixture(scope="module")
def eager(tmp_path_factory, images):
    return run(tmp_path_factory.mktemp("eager"), images, "eager")


def close_runs(got, expected, rtol: float) -> None:
    (checksum, records), (checksum_ref, records_ref) = got, expected
    assert checksum == pytest.approx(checksum_ref, rel=rtol)
    for record, reference in zip(records, records_ref, strict=True):
        assert record["loss"] == pytest.approx(reference["loss"], rel=rtol), record["step"]


@pytest.mark.parametrize("switch", [dict(fused_adam=True), dict(channels_last=True), dict(allow_tf32=True),
                                    dict(pin_memory=True)], ids=lambda s: next(iter(s)))
def test_each_speed_switch_gives_the_eager_result(switch, tmp_path, images, eager):
    close_runs(run(tmp_path, images, "switched", **switch), eager, rtol=1e-4)


def test_persistent_workers_give_the_same_batches_in_every_epoch(tmp_path, images, eager):
    # Workers keep their own copy of the dataset across epochs; the epoch travels with each index,
    # so the second epoch's augmentation is the same as with no workers (exactly the same weights).
    checksum, records = run(tmp_path, images, "workers", num_workers=2, persistent_workers=True)
    assert checksum == eager[0] and [r["loss"] for r in records] == [r["loss"] for r in eager[1]]


def test_compiled_training_gives_the_eager_result(tmp_path, images, eager, monkeypatch):
    # aot_eager: the same graph capture of the encoder, decoder and discriminator as inductor on a GPU,
    # without its minutes of code generation on two CPU cores.
    compile = torch.compile
    compiled = []

    def aot_eager(model=None, **options):
        compiled.append(getattr(model, "__qualname__", type(model).__name__))
        return compile(model, backend="aot_eager", **{k: v for k, v in options.items() if k != "backend"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    close_runs(run(tmp_path, images, "compiled", compile=True), eager, rtol=1e-4)
    assert len(compiled) == 3  # encoder, decoder, discriminator


def test_ema_is_diffusers_ema_model_updated_in_place():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model[1].weight.requires_grad_(False)  # a frozen parameter is copied, not averaged
    ours = ExponentialMovingAverage(list(model.parameters()), decay=0.99)
    theirs = EMAModel(model.parameters(), decay=0.99, foreach=True)
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.step(list(model.parameters()))
        theirs.step(model.parameters())
    assert ours.optimization_step == theirs.optimization_step
    for mine, reference in zip(ours.shadow, theirs.shadow_params, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    with ours.applied_to(list(model.parameters())):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ours.shadow, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    names = [n for n, _ in model.named_parameters()]
    copy = ExponentialMovingAverage(list(model.parameters()), decay=0.99)
    copy.load_full_state(ours.full_state(names), names)
    assert all(torch.equal(a, b) for a, b in zip(copy.shadow, ours.shadow, strict=True))
