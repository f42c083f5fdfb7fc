"""The ``train-generator`` job: stage two on a token cache, from a YAML recipe.

The recipe's ``head`` picks the generator: ``gpt`` (FullVQGPT over token ids, ending with a
``FullVQPipeline``), or ``dit`` (DDPM) / ``flow`` (flow matching): diffusers' DiT over the quantized
latents ``codebook[tokens]`` (the cache needs ``--latents``), ending with a ``LatentFlowPipeline``.
This module holds the recipe, its checks against the cache and the tokenizer, and the entry point;
the stages are in ``fullvq.jobs.generator_stages``. Each step sees one randomly chosen cached view
(centre, flip, ten-crop) of each image. Command line: ``fullvq train-generator`` (see
``configs/generator/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from torch.utils.data import Dataset

from ..config import ConfigError, at_least, check_fields, check_kwargs
from ..generator.gpt import GPT_SIZES, FullVQGPTConfig
from ..generator.latent_flow import DIT_SIZES
from ..tokenizer import FVQModel
from .generator_stages import GPTStage, LatentFlowStage, latent_statistics
from .loop import TrainConfig, Trainer
from .token_cache import CACHE_FILE, TokenCache, tokenizer_sha256

HEADS = ("gpt", "dit", "flow")
# DiT settings the cache decides (code dimension, grid side, classes).
_DIT_FROM_CACHE = ("in_channels", "out_channels", "sample_size", "num_embeds_ada_norm")


@dataclass
class GeneratorTrainSettings(TrainConfig):
    """``TrainConfig`` with LlamaGen's class-to-image defaults: AdamW (0.9, 0.95), weight decay 0.05 on
    matrices and embeddings, lr 1e-4 at global batch 256, constant after an optional warm-up, clip 1.0."""

    output_dir: str = "runs/generator"
    reference_batch_size: int = 256
    lr_schedule: Literal["annealing", "cosine", "constant"] = "constant"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05


GPTTrainConfig = GeneratorTrainSettings  # its name before 0.2 (it serves every head), for one release


@dataclass
class GeneratorTrainConfig:
    head: Literal["gpt", "dit", "flow"] = "gpt"  # gpt: token ids; dit (DDPM) / flow (flow matching): latents
    tokens: str | None = None  # token cache folder (fullvq cache-tokens)
    tokenizer: str | None = None  # default: the folder recorded in the cache; its sha256 must match
    model: dict = field(default_factory=dict)  # FullVQGPTConfig arguments; `size` picks a LlamaGen size
    train: GeneratorTrainSettings = field(default_factory=lambda: GeneratorTrainSettings(max_steps=1000))
    num_samples: Annotated[int, at_least(0)] = 8  # images in each sample grid, classes spread over the cache's labels
    sample_guidance_scale: float | None = None  # default: the head's (2.0 GPT, 4.0 DiT)
    sample_temperature: Annotated[float, at_least(0, "0 = greedy")] = 1.0  # gpt
    sample_num_inference_steps: Annotated[int, at_least(1)] = 50  # dit / flow

    def __post_init__(self):
        check_fields(self)
        if not self.tokens:
            raise ConfigError("set tokens: the token cache folder written by fullvq cache-tokens")
        if not (Path(self.tokens) / CACHE_FILE).is_file():
            raise ConfigError(f"tokens={self.tokens!r} is not a token cache (no {CACHE_FILE}); make one with "
                              "fullvq cache-tokens --tokenizer <tokenizer run>/model --data ... --output "
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


def check_dit_settings(settings: dict, size: str | None) -> dict:
    """``model`` of a dit / flow recipe: ``patch_size``, ``num_classes`` and ``DiTTransformer2DModel``
    arguments, minus the ones the token cache decides."""
    from diffusers import DiTTransformer2DModel


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
    info = cache.info
    path = Path(config.tokenizer or info["tokenizer"])
    if not path.is_dir():
        raise ConfigError(f"no such folder: tokenizer {path} (recorded by the token cache {cache.path}); set "
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


# ----------------------------------------------------------------------------- training data


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


def train_generator(config: GeneratorTrainConfig) -> dict:
    """Train the generator ``config.head`` names; returns the run summary (``<output_dir>/model`` holds
    the GPT or transformer, ``<output_dir>/pipeline`` the ``FullVQPipeline`` or ``LatentFlowPipeline``)."""
    cache = TokenCache(config.tokens)
    tokenizer = load_tokenizer(config, cache)
    dataset = AugmentedTokens(cache)
    if config.head == "gpt":
        gpt_config = build_gpt_config(config, cache)
        make_stage = lambda t: GPTStage(t, config, gpt_config, tokenizer, cache)  # noqa: E731
    else:
        codebook = cache.codebook()
        statistics = latent_statistics(cache, codebook)
        num_classes = cache_num_classes(cache, config.model.get("num_classes"))
        make_stage = lambda t: LatentFlowStage(t, config, tokenizer, cache, codebook, statistics,  # noqa: E731
                                               num_classes)
    trainer = Trainer(config.train, make_stage, dataset, full_config=config)
    summary = trainer.fit()
    if trainer.is_main:
        write_cards(config, cache, trainer.output_dir)
        pipeline = trainer.output_dir / "pipeline"  # what users load next; the loop names only model/
        print(f"wrote {pipeline}: fullvq sample {pipeline} --labels ... --output DIR, or fullvq app {pipeline}")
    return summary


def write_cards(config: GeneratorTrainConfig, cache: TokenCache, output_dir: Path) -> None:
    """Model cards for ``pipeline/`` (and a GPT's ``model/``): command, recipe, data, and the tokenizer's
    measured usage read from the tokenizer's own card."""
    from ..cards import command_line, read_card_facts, write_model_card
    from ..config import to_dict

    facts = dict(command=command_line(), recipe=to_dict(config),
                 data=f"{cache.info.get('source')} (tokens: {config.tokens})")
    tokenizer = cache.info.get("tokenizer")
    measured = (read_card_facts(tokenizer).get("metrics") or {}) if tokenizer else {}
    usage = {f"tokenizer {name}": figures for name, figures in measured.items()}
    write_model_card(output_dir / "pipeline", metrics=usage or None, **facts)
    if config.head == "gpt":
        write_model_card(output_dir / "model", **facts)


__all__ = [
    "HEADS",
    "AugmentedTokens",
    "GeneratorTrainSettings",
    "GPTTrainConfig",
    "GeneratorTrainConfig",
    "build_gpt_config",
    "cache_num_classes",
    "check_dit_settings",
    "load_tokenizer",
    "train_generator",
]
