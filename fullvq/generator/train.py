"""Stage two: ``fullvq train-generator CONFIG [key=value ...]``.

Trains a class-conditional generator on a token cache written by ``fullvq cache-tokens``; also runs
on many GPUs or nodes as ``accelerate launch -m fullvq.cli train-generator CONFIG``. The recipe's
``head`` picks the generator:

- ``gpt`` (default): FullVQGPT over token ids; ``model`` holds ``FullVQGPTConfig`` arguments, plus
  ``size: B|L|XL|XXL|XXXL|3B`` to start from a LlamaGen size. Ends with a ``FullVQPipeline``.
- ``dit`` (DDPM, epsilon prediction) or ``flow`` (flow matching, velocity prediction): diffusers'
  ``DiTTransformer2DModel`` over the quantized latents (the cache needs ``--latents``); ``model``
  holds ``size: S|B|L|XL``, ``patch_size`` and any ``DiTTransformer2DModel`` argument. Ends with a
  ``LatentFlowPipeline``.

Other sections: ``tokens`` (the cache folder), ``tokenizer`` (optional: defaults to the tokenizer
the cache records, whose sha256 must still match) and ``train``. Codebook size, grid, code
dimension and ``num_classes`` come from the cache. Each step sees one randomly chosen cached view
(centre, flip, ten-crop) of each image. The run ends with ``<output_dir>/model`` (the generator)
and ``<output_dir>/pipeline`` (tokenizer + generator + class names). See ``configs/generator/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from ..config import ConfigError, check_kwargs, load_config
from ..training import TrainConfig, Trainer, TrainingStage, save_image_grid
from .cache_tokens import CACHE_FILE, TokenCache, tokenizer_sha256
from .gpt import GPT_SIZES, FullVQGPT, FullVQGPTConfig
from .sampling import sample

HEADS = ("gpt", "dit", "flow")
# DiT settings the cache decides (code dimension, grid side, classes).
_DIT_FROM_CACHE = ("in_channels", "out_channels", "sample_size", "num_embeds_ada_norm")


@dataclass
class GPTTrainConfig(TrainConfig):
    """``TrainConfig`` with LlamaGen's class-to-image defaults: AdamW (0.9, 0.95), weight decay 0.05 on
    matrices and embeddings, lr 1e-4 at global batch 256, constant after an optional warm-up, clip 1.0."""

    output_dir: str = "runs/generator"
    reference_batch_size: int = 256
    lr_schedule: Literal["annealing", "cosine", "constant"] = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05


@dataclass
class GeneratorTrainConfig:
    head: Literal["gpt", "dit", "flow"] = "gpt"  # gpt: token ids; dit (DDPM) / flow (flow matching): latents
    tokens: str | None = None  # token cache folder (fullvq cache-tokens)
    tokenizer: str | None = None  # default: the folder recorded in the cache; its sha256 must match
    model: dict = field(default_factory=dict)  # FullVQGPTConfig arguments; `size` picks a LlamaGen size
    train: GPTTrainConfig = field(default_factory=lambda: GPTTrainConfig(max_steps=1000))
    num_samples: int = 8  # images in each sample grid, classes spread over the cache's labels
    sample_guidance_scale: float = 4.0
    sample_temperature: float = 1.0  # gpt
    sample_num_inference_steps: int = 50  # dit / flow

    def __post_init__(self):
        if not self.tokens:
            raise ConfigError("set tokens: the token cache folder written by fullvq cache-tokens")
        if not (Path(self.tokens) / CACHE_FILE).is_file():
            raise ConfigError(f"tokens={self.tokens!r} is not a token cache (no {CACHE_FILE}); make one with "
                              "fullvq cache-tokens --tokenizer <tokenizer run>/model --source ... --output "
                              f"{self.tokens}")
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {list(HEADS)}")
        settings = dict(self.model)
        size = settings.pop("size", None)
        if self.head == "gpt":
            if size is not None and size not in GPT_SIZES:
                raise ConfigError(f"model.size={size!r} is not one of {list(GPT_SIZES)}")
            checked = check_kwargs("model", settings, FullVQGPTConfig)
        else:
            checked = check_dit_settings(settings, size)
        self.model = {**({"size": size} if size is not None else {}), **checked}
        if self.num_samples < 0:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 0")


def check_dit_settings(settings: dict, size: str | None) -> dict:
    """``model`` of a dit / flow recipe: ``patch_size``, ``num_classes`` and ``DiTTransformer2DModel``
    arguments, minus the ones the token cache decides."""
    from diffusers import DiTTransformer2DModel

    from .latent_flow import DIT_SIZES

    if size is not None and size not in DIT_SIZES:
        raise ConfigError(f"model.size={size!r} is not one of {list(DIT_SIZES)} (DiT sizes)")
    fixed = sorted(set(settings) & set(_DIT_FROM_CACHE))
    if fixed:
        raise ConfigError(f"model.{fixed[0]} is taken from the token cache (code dimension, grid, classes); drop it "
                          "(set model.num_classes to change the number of classes)")
    settings = dict(settings)
    extra = {key: settings.pop(key) for key in ("num_classes",) if key in settings}
    if "num_classes" in extra and (not isinstance(extra["num_classes"], int) or extra["num_classes"] < 1):
        raise ConfigError(f"model.num_classes={extra['num_classes']!r} must be a positive int")
    return {**extra, **check_kwargs("model", settings, DiTTransformer2DModel)}


# ----------------------------------------------------------------------------- checks against the cache


def load_tokenizer(config: GeneratorTrainConfig, cache: TokenCache):
    """The tokenizer the cache was made with, or a ConfigError if its weights or codebook differ."""
    from ..tokenizer import FVQModel

    info = cache.info
    path = Path(config.tokenizer or info["tokenizer"])
    if not path.is_dir():
        raise ConfigError(f"tokenizer folder {path} (recorded by the token cache {cache.path}) does not exist; set "
                          "tokenizer=PATH to the folder of the tokenizer the cache was made with")
    sha = tokenizer_sha256(path)
    if sha != info["tokenizer_sha256"]:
        raise ConfigError(
            f"token cache {cache.path} was made with another tokenizer (sha256 {info['tokenizer_sha256'][:12]}... of "
            f"{info['tokenizer']}) than the one in {path} (sha256 {sha[:12]}...); re-run fullvq cache-tokens with "
            "this tokenizer, or set tokenizer= to the one the tokens came from"
        )
    tokenizer = FVQModel.from_pretrained(str(path)).eval()
    if tokenizer.config.codebook_size != info["codebook_size"]:
        raise ConfigError(f"tokenizer {path} has codebook_size={tokenizer.config.codebook_size} but the token cache "
                          f"{cache.path} says {info['codebook_size']}; re-create the cache with fullvq cache-tokens")
    if tuple(tokenizer.latent_grid()) != cache.grid:
        raise ConfigError(
            f"the token cache's grid {cache.grid} (resolution {info['resolution']}) differs from the tokenizer's "
            f"grid {tuple(tokenizer.latent_grid())} at its sample_size={tokenizer.config.sample_size}, which the "
            "final pipeline decodes; re-cache with --resolution "
            f"{tokenizer.config.sample_size}"
        )
    return tokenizer


def cache_num_classes(cache: TokenCache, num_classes: int | None) -> int:
    """``num_classes`` (default: the cache's), checked to cover every label the cache holds."""
    labels = cache.labels()
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ConfigError(f"token cache {cache.path} holds images without a class label (label {low}); cache a "
                          "source with one sub-folder (or label) per class")
    num_classes = max(cache.info["num_classes"], high + 1) if num_classes is None else num_classes
    if high >= num_classes:
        raise ConfigError(f"the token cache holds class label {high}, outside [0, {num_classes}) "
                          f"(model.num_classes={num_classes}); raise model.num_classes to at least {high + 1}")
    return num_classes


def build_gpt_config(config: GeneratorTrainConfig, cache: TokenCache) -> FullVQGPTConfig:
    """``config.model`` completed with the cache's codebook size, grid and classes; a ConfigError
    if the recipe contradicts them or a label falls outside ``[0, num_classes)``."""
    info = cache.info
    settings = dict(config.model)
    size = settings.pop("size", None)
    fixed = {"codebook_size": info["codebook_size"], "grid_size": list(info["grid"])}
    if "grid_size" in settings:
        grid = settings["grid_size"]
        settings["grid_size"] = [grid, grid] if isinstance(grid, int) else list(grid)
    for key, value in fixed.items():
        if key in settings and settings[key] != value:
            raise ConfigError(
                f"model.{key}={settings[key]} contradicts the token cache {cache.path}, whose tokenizer gives "
                f"{key}={value}; drop model.{key} (it is taken from the cache) or re-cache with a matching tokenizer"
            )
    settings.update(fixed)
    settings["num_classes"] = cache_num_classes(cache, settings.get("num_classes"))
    try:
        return FullVQGPTConfig.from_size(size, **settings) if size else FullVQGPTConfig(**settings)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


# ----------------------------------------------------------------------------- the stage


class AugmentedTokens(Dataset):
    """A token cache as training items: ``{"tokens": (h*w,) long, "label": int}``, one of the image's
    cached views drawn at random (torch's RNG: the Trainer seeds it per item)."""

    def __init__(self, cache: TokenCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        item = self.cache[index]
        view = int(torch.randint(item["tokens"].shape[0], ()))
        return {"tokens": item["tokens"][view], "label": item["label"]}


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


class GeneratorStage(TrainingStage):
    """FullVQGPT on cached tokens: next-token cross-entropy, token accuracy, sample grids, pipeline."""

    def __init__(self, trainer: Trainer, config: GeneratorTrainConfig, gpt_config: FullVQGPTConfig, tokenizer,
                 cache: TokenCache):
        self.config, self.tokenizer, self.cache = config, tokenizer, cache
        model = FullVQGPT(gpt_config)
        self.models = {"model": model}
        self.optimizers = {"model": trainer.adam(decay_groups(model, trainer.config.weight_decay))}
        self.sample_labels = spread_labels(cache, config.num_samples)

    def training_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        trainer, acc = self.trainer, self.trainer.accelerator
        model, optimizer = self.models["model"], self.optimizers["model"]
        tokens = batch["tokens"]
        # The class prefix predicts token 0, so the last token is never an input (LlamaGen's way).
        out = model(input_ids=tokens[:, :-1], class_labels=batch["label"], labels=tokens)
        acc.backward(out.loss)
        grad_norm = trainer.clip(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"loss": out.loss.detach(),
                "token_accuracy": (out.logits.detach().argmax(-1) == tokens).float().mean()}
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=tokens.device).float()
        return logs

    @torch.no_grad()
    def write_samples(self, step: int, folder: Path) -> None:
        if not self.sample_labels:
            return
        model = self.trainer.accelerator.unwrap_model(self.models["model"])
        generator = torch.Generator().manual_seed(self.trainer.config.seed)
        tokens = sample(model, self.sample_labels, guidance_scale=self.config.sample_guidance_scale,
                        temperature=self.config.sample_temperature, generator=generator)
        tokenizer = self.tokenizer.to(model.device)
        images = tokenizer.decode_indices(tokens.view(len(tokens), *model.config.grid_size))
        self.tokenizer.to("cpu")
        save_image_grid([images], folder / f"step-{step}.png")

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The GPT in ``folder``, and beside it ``pipeline/``: tokenizer + GPT + the cache's class names."""
        from ..pipelines.autoregressive import FullVQPipeline

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
                 codebook: torch.Tensor, statistics: tuple[list, list]):
        from .latent_flow import build_transformer, disable_internal_label_dropout, training_scheduler

        self.config, self.tokenizer, self.cache = config, tokenizer, cache
        self.objective = "ddpm" if config.head == "dit" else "flow"
        settings = dict(config.model)
        num_classes = cache_num_classes(cache, settings.pop("num_classes", None))
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
        from .latent_flow import diffusion_loss, drop_labels, null_class

        trainer, acc = self.trainer, self.trainer.accelerator
        model, optimizer = self.models["model"], self.optimizers["model"]
        labels = drop_labels(batch["label"], null_class(acc.unwrap_model(model)))
        loss = diffusion_loss(model, self.objective, self.latents(batch["tokens"]), labels, self.scheduler)
        acc.backward(loss)
        grad_norm = trainer.clip(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {"loss": loss.detach()}
        if grad_norm is not None:
            logs["grad_norm"] = torch.as_tensor(grad_norm, device=loss.device).float()
        return logs

    def pipeline(self, model):
        from ..pipelines.latent_flow import LatentFlowPipeline
        from .latent_flow import sampling_scheduler

        num_classes = model.config.num_embeds_ada_norm
        id2label = {k: v for k, v in self.cache.info["id2label"].items() if k < num_classes} or None
        return LatentFlowPipeline(tokenizer=self.tokenizer, transformer=model,
                                  scheduler=sampling_scheduler(self.objective), id2label=id2label,
                                  latent_mean=self.statistics[0], latent_std=self.statistics[1])

    @torch.no_grad()
    def write_samples(self, step: int, folder: Path) -> None:
        if not self.sample_labels:
            return
        model = self.trainer.accelerator.unwrap_model(self.models["model"])
        was_training = model.training
        pipe = self.pipeline(model.eval())
        self.tokenizer.to(model.device)
        images = pipe(self.sample_labels, guidance_scale=self.config.sample_guidance_scale,
                      num_inference_steps=self.config.sample_num_inference_steps, output_type="pt",
                      generator=torch.Generator().manual_seed(self.trainer.config.seed)).images
        self.tokenizer.to("cpu")
        model.train(was_training)
        save_image_grid([images * 2 - 1], folder / f"step-{step}.png")

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """The transformer in ``folder``, and beside it ``pipeline/`` (a ``LatentFlowPipeline``)."""
        model.save_pretrained(folder)
        self.tokenizer.to("cpu")
        self.pipeline(model).save_pretrained(folder.parent / "pipeline")


def train_generator(config: GeneratorTrainConfig) -> dict:
    """Train the generator ``config.head`` names; returns the run summary (``<output_dir>/model`` holds
    the GPT or transformer, ``<output_dir>/pipeline`` the ``FullVQPipeline`` or ``LatentFlowPipeline``)."""
    cache = TokenCache(config.tokens)
    tokenizer = load_tokenizer(config, cache)
    dataset = AugmentedTokens(cache)
    if config.head == "gpt":
        gpt_config = build_gpt_config(config, cache)
        make_stage = lambda t: GeneratorStage(t, config, gpt_config, tokenizer, cache)  # noqa: E731
    else:
        codebook = cache.codebook()
        statistics = latent_statistics(cache, codebook)
        make_stage = lambda t: LatentFlowStage(t, config, tokenizer, cache, codebook, statistics)  # noqa: E731
    trainer = Trainer(config.train, make_stage, dataset, full_config=config)
    return trainer.fit()


def main(argv: list[str] | None = None, prog: str = "fullvq train-generator") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="YAML recipe (see configs/generator/)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. train.max_steps=100 tokens=tokens/demo model.size=B")
    args = parser.parse_args(argv)
    try:
        config = load_config(GeneratorTrainConfig, args.config, args.overrides)
        train_generator(config)
    except ConfigError as error:
        parser.error(str(error))
    return 0


__all__ = [
    "HEADS",
    "AugmentedTokens",
    "LatentFlowStage",
    "cache_num_classes",
    "check_dit_settings",
    "latent_statistics",
    "spread_labels",
    "GPTTrainConfig",
    "GeneratorStage",
    "GeneratorTrainConfig",
    "build_gpt_config",
    "decay_groups",
    "load_tokenizer",
    "train_generator",
]
