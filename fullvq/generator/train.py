"""Stage two: ``fullvq train-generator CONFIG [key=value ...]``.

Trains the class-conditional GPT on a token cache written by ``fullvq cache-tokens``; also runs on
many GPUs or nodes as ``accelerate launch -m fullvq.cli train-generator CONFIG``. The recipe's
sections: ``tokens`` (the cache folder), ``tokenizer`` (optional: defaults to the tokenizer the
cache records, whose sha256 must still match), ``model`` (``FullVQGPTConfig`` arguments, plus
``size: B|L|XL|XXL|XXXL|3B`` to start from a LlamaGen size) and ``train``. ``codebook_size``,
``grid_size`` and ``num_classes`` come from the cache. Each step sees one randomly chosen cached
view (centre, flip, ten-crop) of each image. The run ends with ``<output_dir>/model`` (the GPT)
and ``<output_dir>/pipeline`` (a ``FullVQPipeline`` of tokenizer + GPT + class names). See
``configs/generator/``.
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
    tokens: str | None = None  # token cache folder (fullvq cache-tokens)
    tokenizer: str | None = None  # default: the folder recorded in the cache; its sha256 must match
    model: dict = field(default_factory=dict)  # FullVQGPTConfig arguments; `size` picks a LlamaGen size
    train: GPTTrainConfig = field(default_factory=lambda: GPTTrainConfig(max_steps=1000))
    num_samples: int = 8  # images in each sample grid, classes spread over the cache's labels
    sample_guidance_scale: float = 4.0
    sample_temperature: float = 1.0

    def __post_init__(self):
        if not self.tokens:
            raise ConfigError("set tokens: the token cache folder written by fullvq cache-tokens")
        if not (Path(self.tokens) / CACHE_FILE).is_file():
            raise ConfigError(f"tokens={self.tokens!r} is not a token cache (no {CACHE_FILE}); make one with "
                              "fullvq cache-tokens --tokenizer <tokenizer run>/model --source ... --output "
                              f"{self.tokens}")
        settings = dict(self.model)
        size = settings.pop("size", None)
        if size is not None and size not in GPT_SIZES:
            raise ConfigError(f"model.size={size!r} is not one of {list(GPT_SIZES)}")
        self.model = {**({"size": size} if size is not None else {}),
                      **check_kwargs("model", settings, FullVQGPTConfig)}
        if self.num_samples < 0:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 0")


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
    labels = cache.labels()
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ConfigError(f"token cache {cache.path} holds images without a class label (label {low}); cache a "
                          "source with one sub-folder (or label) per class")
    num_classes = settings.setdefault("num_classes", max(info["num_classes"], high + 1))
    if high >= num_classes:
        raise ConfigError(f"the token cache holds class label {high}, outside [0, {num_classes}) "
                          f"(model.num_classes={num_classes}); raise model.num_classes to at least {high + 1}")
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
        present = sorted(set(cache.labels().tolist()))
        picks = torch.linspace(0, len(present) - 1, config.num_samples).round().long().tolist() if present else []
        self.sample_labels = [present[i] for i in picks]

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


def train_generator(config: GeneratorTrainConfig) -> dict:
    """Train the GPT as ``config`` says; returns the run summary (``<output_dir>/model`` holds the GPT,
    ``<output_dir>/pipeline`` the ``FullVQPipeline``)."""
    cache = TokenCache(config.tokens)
    tokenizer = load_tokenizer(config, cache)
    gpt_config = build_gpt_config(config, cache)
    dataset = AugmentedTokens(cache)
    trainer = Trainer(config.train, lambda t: GeneratorStage(t, config, gpt_config, tokenizer, cache), dataset,
                      full_config=config)
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
    "AugmentedTokens",
    "GPTTrainConfig",
    "GeneratorStage",
    "GeneratorTrainConfig",
    "build_gpt_config",
    "decay_groups",
    "load_tokenizer",
    "train_generator",
]
