"""What every class-conditional pipeline of fullvq shares: class names, hub loading, outputs.

``FullVQPipeline`` (GPT over token ids) and ``LatentFlowPipeline`` (DiT over latents) differ only in
how they make a latent grid; label lookup (ids, names, ImageNet synonyms), fetching a hub repo and
turning decoded images into PIL / numpy / torch outputs live here once.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from huggingface_hub import snapshot_download

OUTPUT_TYPES = ("pil", "np", "pt")

# from_pretrained settings that concern fetching a hub repo (diffusers ignores them for a local folder).
DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

# Quantizers whose indices are not one token per grid cell (neither head handles them).
MULTI_TOKEN_QUANTIZERS = ("residual", "multiscale")


def _normalise_name(name: str) -> str:
    return " ".join(name.split()).casefold()


class ClassConditionalPipeline(DiffusionPipeline):
    """Base of fullvq's pipelines: subclasses register their modules, call ``_set_labels`` and
    define ``num_classes``; ``_component_folders`` names the folders a hub download needs."""

    _component_folders: tuple[str, ...] = ()
    # The settings of this kind of pipeline's sampling, beside guidance_scale (their defaults are
    # those of __call__): what `fullvq sample` and gFID pass on, and refuse for the other kind.
    sampling_settings: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by ``save_pretrained``, or a hub id with the same layout.

        ``kwargs`` are diffusers' (``dtype``, ``device_map``, ``revision``, ``cache_dir``, ``token``, ...).
        """
        if not os.path.isdir(pretrained_model_name_or_path):
            # diffusers' own download refuses component classes from outside diffusers/transformers
            # unless the repo ships their code, so fetch the folder here and load it locally.
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path),
                allow_patterns=[cls.config_name, *(f"{folder}/*" for folder in cls._component_folders)],
                **{key: kwargs[key] for key in DOWNLOAD_KWARGS if key in kwargs},
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def _set_labels(self, id2label: dict | None) -> dict[int, str] | None:
        """Check ``id2label`` against ``num_classes`` and index its names; returns it with int keys."""
        id2label = _check_id2label(id2label, self.num_classes)
        self._label_index = _label_index(id2label or {})
        return id2label

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
                f"class label {int(label)} is outside [0, {self.num_classes}): the generator has "
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

    def sampling_options(self, **given) -> dict:
        """Every sampling setting of this pipeline (``guidance_scale`` and ``sampling_settings``): the
        ``given`` values that are not None, the defaults of ``__call__`` for the rest.

        Raises ``ValueError`` naming the given settings that belong to another kind of pipeline.
        """
        names = ("guidance_scale", *self.sampling_settings)
        foreign = [name for name, value in given.items() if value is not None and name not in names]
        if foreign:
            raise ValueError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to a "
                             f"{type(self).__name__} (it samples with {', '.join(names)}); drop "
                             f"{'it' if len(foreign) == 1 else 'them'}")
        defaults = inspect.signature(type(self).__call__).parameters
        return {name: given[name] if given.get(name) is not None else defaults[name].default for name in names}

    def _check_call(self, class_labels, num_images_per_label: int, batch_size: int, output_type: str,
                    generator) -> list[list[int]]:
        """Validate the arguments both pipelines share; returns the label ids in batches."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label={num_images_per_label} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if isinstance(generator, (list, tuple)):
            raise TypeError("generator must be one torch.Generator (a list of generators is not supported)")
        ids = [i for i in self.get_label_ids(class_labels) for _ in range(num_images_per_label)]
        return [ids[start:start + batch_size] for start in range(0, len(ids), batch_size)]

    def _output(self, decoded: list[torch.Tensor], output_type: str, return_dict: bool):
        """Decoded batches in [-1, 1] -> ``ImagePipelineOutput`` (or a tuple) of ``output_type``."""
        images = torch.cat([((batch.float() + 1) / 2).clamp(0, 1).cpu() for batch in decoded])
        self.maybe_free_model_hooks()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def check_sample_size(tokenizer, sample_size: int | None) -> int:
    """The tokenizer's image side in pixels; a given ``sample_size`` must equal it."""
    tokenizer_size = int(tokenizer.config.sample_size)
    if sample_size is not None and int(sample_size) != tokenizer_size:
        raise ValueError(
            f"sample_size={sample_size} does not match the tokenizer's sample_size={tokenizer_size}; "
            "omit sample_size to take it from the tokenizer"
        )
    return tokenizer_size


def check_single_codebook(tokenizer, head: str) -> None:
    quantizer = tokenizer.config.quantizer
    if quantizer in MULTI_TOKEN_QUANTIZERS:
        raise ValueError(
            f"the tokenizer's quantizer {quantizer!r} gives several tokens per grid cell but {head} expects one "
            "code per cell; use a single-codebook tokenizer (vq, simvq, lc, fvq)"
        )


def _check_id2label(id2label: dict | None, num_classes: int) -> dict[int, str] | None:
    if not id2label:
        return None
    try:
        checked = {int(key): str(name) for key, name in id2label.items()}
    except (TypeError, ValueError, AttributeError):
        raise TypeError(f"id2label must map int class ids to names, got {type(id2label).__name__}") from None
    bad = sorted(key for key in checked if not 0 <= key < num_classes)
    if bad:
        raise ValueError(f"id2label has ids {bad[:10]} outside [0, {num_classes}) (the generator's num_classes)")
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
