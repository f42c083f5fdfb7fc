"""FullVQPipeline: class labels -> image tokens (FullVQGPT) -> images (FVQModel).

The pipeline only wires the two models and loops over batches; the sampling maths lives in
:func:`fullvq.generator.sampling.sample` and the decoding in :meth:`FVQModel.decode_indices`.
A pipeline folder is diffusers' layout: ``model_index.json`` (component classes, ``id2label`` and
``sample_size``) plus one folder per component (``tokenizer/``, ``gpt/``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from huggingface_hub import snapshot_download

from fullvq.generator.gpt import FullVQGPT
from fullvq.generator.sampling import sample
from fullvq.tokenizer.modeling import FVQModel

OUTPUT_TYPES = ("pil", "np", "pt")

# from_pretrained settings that concern fetching a hub repo (diffusers ignores them for a local folder).
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

# Quantizers whose indices are not one token per grid cell, which is what the GPT predicts.
_MULTI_TOKEN_QUANTIZERS = ("residual", "multiscale")


def _normalise_name(name: str) -> str:
    return " ".join(name.split()).casefold()


class FullVQPipeline(DiffusionPipeline):
    """Class-conditional image generation with a GPT over the tokens of an FVQ tokenizer.

    Args:
        tokenizer: the :class:`~fullvq.tokenizer.modeling.FVQModel` whose codes the GPT was trained on.
        gpt: the :class:`~fullvq.generator.gpt.FullVQGPT`; its ``codebook_size`` and ``grid_size`` must
            match the tokenizer's codebook and latent grid at ``tokenizer.config.sample_size``.
        id2label: class id -> name (ImageNet style ``"golden retriever"`` or ``"tench, Tinca tinca"``,
            where each comma-separated synonym is accepted too); saved in ``model_index.json``.
        sample_size: image side in pixels, recorded in ``model_index.json``; ``None`` takes the
            tokenizer's ``sample_size`` (a given value must equal it).
    """

    model_cpu_offload_seq = "gpt->tokenizer"

    def __init__(
        self,
        tokenizer: FVQModel,
        gpt: FullVQGPT,
        id2label: dict[int, str] | dict[str, str] | None = None,  # str keys: as read back from JSON
        sample_size: int | None = None,
    ):
        super().__init__()
        image_size = _check_components(tokenizer, gpt)
        if sample_size is not None and int(sample_size) != image_size:
            raise ValueError(
                f"sample_size={sample_size} does not match the tokenizer's sample_size={image_size}; "
                "omit sample_size to take it from the tokenizer"
            )
        id2label = _check_id2label(id2label, gpt.config.num_classes)
        self.register_modules(tokenizer=tokenizer, gpt=gpt)
        # Plain settings persist in model_index.json only through the config (JSON keys become strings).
        self.register_to_config(id2label=id2label, sample_size=image_size)
        self._label_index = _label_index(id2label or {})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "FullVQPipeline":
        """Load a folder written by ``save_pretrained``, or a hub id with the same layout.

        ``kwargs`` are diffusers' (``dtype``, ``device_map``, ``revision``, ``cache_dir``, ``token``, ...).
        """
        if not os.path.isdir(pretrained_model_name_or_path):
            # diffusers' own download refuses component classes from outside diffusers/transformers
            # unless the repo ships their code, so fetch the folder here and load it locally.
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path),
                allow_patterns=[cls.config_name, "tokenizer/*", "gpt/*"],
                **{key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs},
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.gpt.config.num_classes

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id for every name in ``id2label`` (full names, not the synonyms)."""
        return {name: int(key) for key, name in (self.config.id2label or {}).items()}

    def get_label_ids(self, labels: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Class ids for ints, class names or a mix; names match ``id2label`` entries or any of their
        comma-separated synonyms, ignoring case and extra spaces.

        Raises ``ValueError`` for unknown or ambiguous names (listing close matches) and for ids
        outside ``[0, num_classes)``.
        """
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, (int, str, np.integer)):
            labels = [labels]
        ids = [self._label_id(label) for label in labels]
        if not ids:
            raise ValueError("class_labels is empty; pass at least one class id or name")
        return ids

    def _label_id(self, label) -> int:
        if isinstance(label, str):
            return self._name_to_id(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"class label {label!r} must be an int id or a class name, got {type(label).__name__}")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(
                f"class label {int(label)} is outside [0, {self.num_classes}): the GPT has "
                f"num_classes={self.num_classes}"
            )
        return int(label)

    def _name_to_id(self, name: str) -> int:
        if not self._label_index:
            raise ValueError(
                f"class name {name!r} cannot be resolved: this pipeline has no id2label; "
                f"pass integer ids in [0, {self.num_classes})"
            )
        ids = self._label_index.get(_normalise_name(name))
        if ids is None:
            close = difflib.get_close_matches(_normalise_name(name), list(self._label_index), n=5, cutoff=0.6)
            hint = ", ".join(f"{match!r} ({self._label_index[match][0]})" for match in close)
            raise ValueError(
                f"unknown class name {name!r}; "
                + (f"close matches: {hint}" if hint else "no close match in id2label")
                + f"; see pipe.labels or pass an integer id in [0, {self.num_classes})"
            )
        if len(ids) > 1:
            id2label = self.config.id2label
            listing = ", ".join(f"{i} ({id2label[i]!r})" for i in ids)
            raise ValueError(f"class name {name!r} is ambiguous: it names classes {listing}; pass the integer id")
        return ids[0]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_images_per_label: int = 1,
        guidance_scale: float = 4.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int = 32,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_label`` images for each class label.

        Args:
            class_labels: class ids, names (see :meth:`get_label_ids`) or a mix.
            num_images_per_label: images per label; images come label by label, in the order given.
            guidance_scale: classifier-free guidance scale; 1 turns guidance off (half the compute).
                Default 4.0, as LlamaGen's class-to-image sample script; its FID runs use 1.5 - 2.
            guidance_schedule: ``"constant"`` or ``"linear"`` (a ramp from 1 to ``guidance_scale``).
            temperature, top_k, top_p: token sampling (temperature 0 = greedy; top_k 0 and top_p 1 = off).
            generator: a ``torch.Generator`` for reproducible images (one generator for the whole call).
            batch_size: images sampled at once; bounds memory (the KV cache grows with it). The images
                drawn for a seed depend on it.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` ((N, H, W, 3) float32 in [0, 1]) or
                ``"pt"`` ((N, 3, H, W) float32 in [0, 1]).
            return_dict: return an :class:`ImagePipelineOutput` rather than a tuple ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label={num_images_per_label} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if isinstance(generator, (list, tuple)):
            raise TypeError("generator must be one torch.Generator (a list of generators is not supported)")
        ids = [i for i in self.get_label_ids(class_labels) for _ in range(num_images_per_label)]
        height, width = self.gpt.config.grid_size

        images = []
        batches = [ids[start:start + batch_size] for start in range(0, len(ids), batch_size)]
        for batch in self.progress_bar(batches):
            tokens = sample(
                self.gpt,
                torch.tensor(batch, device=self.gpt.device),
                guidance_scale=guidance_scale,
                guidance_schedule=guidance_schedule,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )
            decoded = self.tokenizer.decode_indices(tokens.view(len(batch), height, width))
            images.append(((decoded.float() + 1) / 2).clamp(0, 1).cpu())
        images = torch.cat(images)

        self.maybe_free_model_hooks()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _check_components(tokenizer: FVQModel, gpt: FullVQGPT) -> int:
    """Raise unless the GPT's tokens are this tokenizer's codes on its latent grid; returns the image size."""
    quantizer = tokenizer.config.quantizer
    if quantizer in _MULTI_TOKEN_QUANTIZERS:
        raise ValueError(
            f"the tokenizer's quantizer {quantizer!r} gives several tokens per grid cell but FullVQGPT predicts "
            "one; use a single-codebook tokenizer (vq, simvq, lc, fvq)"
        )
    if tokenizer.config.codebook_size != gpt.config.codebook_size:
        raise ValueError(
            f"the tokenizer's codebook_size={tokenizer.config.codebook_size} differs from the GPT's "
            f"codebook_size={gpt.config.codebook_size}; pair the GPT with the tokenizer its tokens came from"
        )
    image_size = tokenizer.config.sample_size
    grid = tuple(tokenizer.latent_grid())
    if grid != tuple(gpt.config.grid_size):
        raise ValueError(
            f"the tokenizer's latent grid {grid} (sample_size={image_size}, downsample factor "
            f"{tokenizer.downsample_factor}) differs from the GPT's grid_size {tuple(gpt.config.grid_size)}; "
            "set the tokenizer's sample_size or the GPT's grid_size so they match"
        )
    return int(image_size)


def _check_id2label(id2label: dict | None, num_classes: int) -> dict[int, str] | None:
    if not id2label:
        return None
    try:
        checked = {int(key): str(name) for key, name in id2label.items()}
    except (TypeError, ValueError, AttributeError):
        raise TypeError(f"id2label must map int class ids to names, got {type(id2label).__name__}") from None
    bad = sorted(key for key in checked if not 0 <= key < num_classes)
    if bad:
        raise ValueError(f"id2label has ids {bad[:10]} outside [0, {num_classes}) (the GPT's num_classes)")
    return dict(sorted(checked.items()))


def _label_index(id2label: dict[int, str]) -> dict[str, list[int]]:
    """Normalised name or synonym -> class ids carrying it (more than one id = ambiguous).

    A full name wins over a synonym ("maillot" is class 638's name and a synonym of 639's).
    """
    names: dict[str, list[int]] = {}
    synonyms: dict[str, list[int]] = {}
    for key, name in id2label.items():
        names.setdefault(_normalise_name(name), []).append(key)
        for part in {_normalise_name(part) for part in name.split(",")} - {"", _normalise_name(name)}:
            synonyms.setdefault(part, []).append(key)
    return {**synonyms, **names}
