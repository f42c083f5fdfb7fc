"""The two stage-two training stages the ``train-generator`` job runs (``fullvq.jobs.train_generator``).

- ``GPTStage``: FullVQGPT on cached token ids, next-token cross-entropy; ends with a ``FullVQPipeline``.
- ``LatentFlowStage``: a DiT on the cached latents ``codebook[tokens]`` with a DDPM (``dit``) or
  flow-matching (``flow``) loss; ends with a ``LatentFlowPipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from ..generator.gpt import FullVQGPT, FullVQGPTConfig
from ..generator.latent_flow import (
    build_transformer,
    diffusion_loss,
    disable_internal_label_dropout,
    drop_labels,
    null_class,
    sampling_scheduler,
    training_scheduler,
)
from ..generator.sampling import DEFAULT_GUIDANCE_SCALE, sample
from ..images import from_unit_range, save_image_grid
from ..pipelines.autoregressive import FullVQPipeline
from ..pipelines.latent_flow import LatentFlowPipeline
from .loop import Trainer, TrainingStage
from .token_cache import TokenCache

if TYPE_CHECKING:
    from .train_generator import GeneratorTrainConfig


def spread_labels(cache: TokenCache, count: int) -> list[int]:
    """``count`` class labels spread evenly over those the cache holds (for sample grids)."""
    present = sorted(set(cache.labels().tolist()))
    picks = torch.linspace(0, len(present) - 1, count).round().long().tolist() if present else []
    return [present[i] for i in picks]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as LlamaGen (nanoGPT) sets them: matrices and embeddings decay,
    norms (and any bias) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class GPTStage(TrainingStage):
    """FullVQGPT on cached tokens: next-token cross-entropy, token accuracy, sample grids, pipeline."""

    def __init__(self, trainer: Trainer, config: GeneratorTrainConfig, gpt_config: FullVQGPTConfig, tokenizer,
                 cache: TokenCache):
        self.config, self.tokenizer, self.cache = config, tokenizer, cache
        model = FullVQGPT(gpt_config)
        self.models = {"model": model}
        self.optimizers = {"model": trainer.adam(decay_groups(model, trainer.config.weight_decay))}
        self.sample_labels = spread_labels(cache, config.num_samples)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        # The class prefix predicts token 0, so the last token is never an input (LlamaGen's way).
        # No logits back: the loss is computed in chunks, never holding (B, 256, K) float32 logits.
        out = self.models["model"](input_ids=tokens[:, :-1], class_labels=batch["label"], labels=tokens,
                                   return_logits=False)
        grad_norm = self.trainer.optimizer_step("model", out.loss)
        logs = {"loss": out.loss.detach(), "token_accuracy": out.token_accuracy.detach()}
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=tokens.device).float()
        return logs

    @torch.no_grad()
    def write_samples(self, step: int, folder: Path, model: torch.nn.Module) -> None:
        if not self.sample_labels:
            return
        generator = torch.Generator().manual_seed(self.trainer.config.seed)
        guidance_scale = self.config.sample_guidance_scale
        tokens = sample(model, self.sample_labels,
                        guidance_scale=DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale,
                        temperature=self.config.sample_temperature, generator=generator)
        tokenizer = self.tokenizer.to(model.device)
        images = tokenizer.decode_indices(tokens.view(len(tokens), *model.config.grid_size))
        self.tokenizer.to("cpu")
        save_image_grid([images], folder / f"step-{step}.png")

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The GPT in ``folder``, and beside it ``pipeline/``: tokenizer + GPT + the cache's class names."""
        model.save_pretrained(folder)
        num_classes = model.config.num_classes
        id2label = {k: v for k, v in self.cache.info["id2label"].items() if k < num_classes} or None
        pipeline = FullVQPipeline(tokenizer=self.tokenizer.to("cpu"), gpt=model, id2label=id2label)
        pipeline.save_pretrained(folder.parent / "pipeline")


def latent_statistics(cache: TokenCache, codebook: torch.Tensor, max_images: int = 10_000) -> tuple[list, list]:
    """Per-channel mean and std of the latents ``codebook[tokens]`` over (up to ``max_images`` evenly
    spaced) cached images and all their views, exactly, from the code counts."""
    positions = torch.linspace(0, len(cache) - 1, min(len(cache), max_images)).round().long().unique().tolist()
    counts = torch.zeros(len(codebook), dtype=torch.float64)
    for index in positions:
        counts += torch.bincount(cache[index]["tokens"].reshape(-1), minlength=len(codebook)).double()
    weights = counts / counts.sum()
    codes = codebook.double()
    mean = weights @ codes
    std = (weights @ codes.square() - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float().tolist(), std.float().tolist()


class LatentFlowStage(TrainingStage):
    """A DiT on the cached latents ``codebook[tokens]``: DDPM (``dit``) or flow-matching (``flow``) loss,
    labels dropped to the null class 10 % of the time, sample grids, ``LatentFlowPipeline``."""

    def __init__(self, trainer: Trainer, config: GeneratorTrainConfig, tokenizer, cache: TokenCache,
                 codebook: torch.Tensor, statistics: tuple[list, list], num_classes: int):
        self.config, self.tokenizer, self.cache = config, tokenizer, cache
        self.objective = "ddpm" if config.head == "dit" else "flow"
        settings = {key: value for key, value in config.model.items() if key != "num_classes"}
        height, width = cache.grid
        if height != width:
            raise ConfigError(f"the token cache's grid {cache.grid} is not square; DiT needs a square latent grid")
        try:
            model = build_transformer(latent_channels=codebook.shape[1], grid_size=height, num_classes=num_classes,
                                      **settings)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
        disable_internal_label_dropout(model)
        self.models = {"model": model}
        self.optimizers = {"model": trainer.adam(decay_groups(model, trainer.config.weight_decay))}
        self.scheduler = training_scheduler(self.objective)
        device = trainer.accelerator.device
        self.codebook = codebook.to(device)
        self.mean, self.std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in statistics)
        self.statistics = statistics
        self.sample_labels = spread_labels(cache, config.num_samples)

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w) ids -> normalised (B, D, h, w) latents."""
        h, w = self.cache.grid
        codes = self.codebook[tokens].view(len(tokens), h, w, -1).permute(0, 3, 1, 2)
        return (codes - self.mean) / self.std

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        model = self.models["model"]
        labels = drop_labels(batch["label"], null_class(self.trainer.accelerator.unwrap_model(model)))
        loss = diffusion_loss(model, self.objective, self.latents(batch["tokens"]), labels, self.scheduler)
        grad_norm = self.trainer.optimizer_step("model", loss)
        logs = {"loss": loss.detach()}
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=loss.device).float()
        return logs

    def pipeline(self, model):
        num_classes = model.config.num_embeds_ada_norm
        id2label = {k: v for k, v in self.cache.info["id2label"].items() if k < num_classes} or None
        return LatentFlowPipeline(tokenizer=self.tokenizer, transformer=model,
                                  scheduler=sampling_scheduler(self.objective), id2label=id2label,
                                  latent_mean=self.statistics[0], latent_std=self.statistics[1])

    @torch.no_grad()
    def write_samples(self, step: int, folder: Path, model: torch.nn.Module) -> None:
        if not self.sample_labels:
            return
        was_training = model.training
        pipe = self.pipeline(model.eval())
        self.tokenizer.to(model.device)
        options = pipe.sampling_options(guidance_scale=self.config.sample_guidance_scale,
                                        num_inference_steps=self.config.sample_num_inference_steps)
        images = pipe(self.sample_labels, **options, output_type="pt",
                      generator=torch.Generator().manual_seed(self.trainer.config.seed)).images
        self.tokenizer.to("cpu")
        model.train(was_training)
        save_image_grid([from_unit_range(images)], folder / f"step-{step}.png")

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The transformer in ``folder``, and beside it ``pipeline/`` (a ``LatentFlowPipeline``)."""
        model.save_pretrained(folder)
        self.tokenizer.to("cpu")
        self.pipeline(model).save_pretrained(folder.parent / "pipeline")


__all__ = ["GPTStage", "LatentFlowStage", "decay_groups", "latent_statistics", "spread_labels"]
