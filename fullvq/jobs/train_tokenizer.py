"""The ``train-tokenizer`` job: stage one from a YAML recipe (``fullvq train-tokenizer CONFIG``).

The recipe's sections: ``model`` (``FVQModel`` arguments), ``loss`` (``TokenizerLoss``
arguments), ``data`` and ``train`` (``TrainConfig``); ``codebook_path`` fills an ``lc``
codebook. See ``configs/tokenizer/``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from ..config import ConfigError, at_least, build_section, check_fields, check_kwargs
from ..data import build_dataset
from ..images import from_uint8, save_image_grid, save_usage_histogram
from ..tokenizer.losses import TokenizerLoss
from ..tokenizer.modeling import FVQModel
from ..tokenizer.quantizers import CodebookUsage
from .loop import TrainConfig, Trainer, TrainingStage


@dataclass
class DataConfig:
    source: str = "demo"  # an image folder, a dataset name on the hub, or "demo" (MNIST, offline)
    # image side in pixels; default (and must equal) model.sample_size
    resolution: Annotated[int, at_least(1)] | None = None
    split: str = "train"
    streaming: bool = False
    image_column: str | None = None
    label_column: str | None = None

    def __post_init__(self):
        check_fields(self)


@dataclass
class TokenizerTrainSettings(TrainConfig):
    """``TrainConfig`` with the tokenizer's defaults (FVQ's schedule, global batch 128 reference)."""

    output_dir: str = "runs/tokenizer"


@dataclass
class TokenizerTrainConfig:
    model: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TokenizerTrainSettings = field(default_factory=lambda: TokenizerTrainSettings(max_steps=1000))
    codebook_path: str | None = None  # lc: k-means centres (fullvq init-codebook) for the frozen codebook
    num_samples: Annotated[int, at_least(0)] = 8  # images in each reconstruction grid

    def __post_init__(self):
        check_fields(self)
        self.model = check_kwargs("model", self.model, FVQModel)
        self.loss = check_kwargs("loss", self.loss, TokenizerLoss)
        if self.codebook_path is not None and not Path(self.codebook_path).is_file():
            raise ConfigError(f"codebook_path={self.codebook_path!r} does not exist; make it with fullvq init-codebook")
        if self.model.get("quantizer") == "lc" and self.codebook_path is None and not self.train.resume:
            raise ConfigError("quantizer=lc needs codebook_path (k-means centres from fullvq init-codebook)")
        self._match_resolution()

    def _match_resolution(self) -> None:
        """One number, two names: the training images' side (``data.resolution``) is the tokenizer's
        ``model.sample_size``, which token caches and pipelines later trust. Either derives the other."""
        sample_size = self.model.get("sample_size")
        if self.data.resolution is None:
            default = inspect.signature(FVQModel.__init__).parameters["sample_size"].default
            self.data.resolution = default if sample_size is None else sample_size
        elif sample_size is None:
            self.model["sample_size"] = self.data.resolution
        elif sample_size != self.data.resolution:
            raise ConfigError(
                f"data.resolution={self.data.resolution} differs from model.sample_size={sample_size}; they are the "
                "same number (the image side the tokenizer is trained and used at): set them equal, or give one "
                "and the other follows"
            )


def as_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1]: uint8 batches (the job's data path) are mapped on their device."""
    return from_uint8(pixels) if pixels.dtype == torch.uint8 else pixels


class TokenizerStage(TrainingStage):
    """FVQModel + TokenizerLoss: reconstruction, LPIPS, quantizer and (from a step on) GAN losses."""

    def __init__(self, trainer: Trainer, config: TokenizerTrainConfig, dataset):
        self.config = config
        self.dataset = dataset
        device = trainer.accelerator.device
        model = build_section("model", FVQModel, config.model)
        if config.codebook_path is not None:
            build_section("codebook_path", model.quantize.load_codebook, {"source": config.codebook_path})
        resolution = config.data.resolution
        if resolution % model.downsample_factor:
            raise ConfigError(f"data.resolution={resolution} is not divisible by the tokenizer's downsample factor "
                              f"{model.downsample_factor}")
        self.loss_fn = build_section("loss", TokenizerLoss, config.loss).to(device)
        self.models = {"model": model}
        self.optimizers = {"model": trainer.adam(model.parameters())}
        if self.loss_fn.discriminator is not None:
            self.models["discriminator"] = self.loss_fn.discriminator
            self.optimizers["discriminator"] = trainer.adam(self.loss_fn.discriminator.parameters())
        self.usage = CodebookUsage(model.config.codebook_size, device=device)
        self.last_usage: CodebookUsage | None = None  # the counts of the last log window, for the PNG
        self.skipped = 0.0
        # A fixed set of training images spread over the set (sets are often sorted by class).
        count = min(config.num_samples, len(dataset)) if hasattr(dataset, "__len__") else 0
        picks = [i * len(dataset) // count for i in range(count)] if count else []
        self.sample_images = torch.stack([dataset[i]["pixel_values"] for i in picks]) if count else None

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        trainer, acc = self.trainer, self.trainer.accelerator
        model = self.models["model"]
        images = as_model_input(batch["pixel_values"])
        out = model(images)
        last_layer = acc.unwrap_model(model).decoder.conv_out.weight
        loss, logs = self.loss_fn.generator_loss(images, out.sample, out.loss, step, last_layer)
        grad_norm = trainer.optimizer_step("model", loss)
        if self.loss_fn.gan_active(step):
            # The generator pass left no gradient here (loss_fn freezes the discriminator for it), so under
            # gradient accumulation the discriminator's gradients sum its own loss over the micro-batches.
            d_loss, d_logs = self.loss_fn.discriminator_loss(images, out.sample, step, self.models["discriminator"])
            trainer.optimizer_step("discriminator", d_loss)
            logs.update(d_logs)
        self.usage.update(out.indices)
        if "skipped" in batch:  # stays on the host (loop.HOST_KEYS): no device read
            self.skipped += int(batch["skipped"].sum())
        logs.update(loss=loss.detach(), codebook_loss=out.codebook_loss.detach(),
                    commitment_loss=out.commitment_loss.detach())
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=images.device).float()
        return logs

    def after_optimizer_step(self, name: str) -> None:
        # Slot revival (fvq) is a training policy, run here once the weights have stepped.
        if name == "model":
            self.trainer.accelerator.unwrap_model(self.models["model"]).revive_dead_slots()

    def periodic_logs(self, step: int) -> dict[str, float]:
        """Code usage and perplexity over every token since the last log, summed over processes."""
        self.usage.all_reduce()
        figures = {"usage": self.usage.usage, "perplexity": self.usage.perplexity,
                   "dead_codes": self.usage.dead_codes, "usage_tokens": self.usage.total}
        # Unreadable files passed over since the last log, over every process and worker.
        skipped = torch.tensor([self.skipped], device=self.usage.counts.device)
        figures["skipped_images"] = float(self.trainer.accelerator.reduce(skipped, "sum"))
        self.skipped = 0.0
        self.last_usage = CodebookUsage(self.usage.codebook_size)
        self.last_usage.counts = self.usage.counts.cpu().clone()
        self.usage.reset()
        return figures

    @torch.no_grad()
    def write_samples(self, step: int, folder: Path, model: torch.nn.Module) -> None:
        if self.last_usage is not None:
            save_usage_histogram(self.last_usage, self.trainer.output_dir / "usage" / f"step-{step}.png", step)
        if self.sample_images is None:
            return
        was_training = model.training
        model.eval()
        images = as_model_input(self.sample_images.to(self.trainer.accelerator.device))
        reconstructions = model(images).sample
        model.train(was_training)
        save_image_grid([images, reconstructions], folder / f"step-{step}.png")


def train_tokenizer(config: TokenizerTrainConfig) -> dict:
    """Train a tokenizer as ``config`` says; returns the run summary (the model is in ``<output_dir>/model``)."""
    data = config.data
    # uint8 pixels through the DataLoader (a quarter of the bytes in workers' shared memory and the
    # host-to-device copy), mapped to [-1, 1] on the device bit for bit as the float transforms would.
    dataset = build_section("data", build_dataset, dict(
        source=data.source, resolution=data.resolution, train=True, split=data.split, uint8=True,
        streaming=data.streaming, image_column=data.image_column, label_column=data.label_column),
        errors=(FileNotFoundError, ValueError))
    trainer = Trainer(config.train, lambda t: TokenizerStage(t, config, dataset), dataset, full_config=config)
    summary = trainer.fit()
    if trainer.is_main:  # the card reads the recipe from model/train_config.yaml
        from ..cards import command_line, usage_figures, write_model_card

        usage = trainer.stage.last_usage
        write_model_card(trainer.output_dir / "model", command=command_line(), data=str(data.source),
                         metrics={"training, last log window": usage_figures(usage)} if usage is not None else None)
    return summary


__all__ = ["DataConfig", "TokenizerTrainSettings", "TokenizerTrainConfig", "TokenizerStage", "train_tokenizer"]
