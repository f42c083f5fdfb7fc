"""What every class-conditional pipeline of fullvq shares: class names, folders, hub loading, outputs.

``FullVQPipeline`` (GPT over token ids) and ``LatentFlowPipeline`` (DiT over latents) differ only in
how they make a latent grid; label lookup (ids, names, ImageNet synonyms), the folder layout that
diffusers' own ``DiffusionPipeline.from_pretrained`` loads, fetching a hub repo and turning decoded
images into PIL / numpy / torch outputs live here once.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from huggingface_hub import snapshot_download

from fullvq.io import check_saved_folder, local_folder_or_hub_id

OUTPUT_TYPES = ("pil", "np", "pt")

# from_pretrained settings that concern fetching a hub repo (diffusers ignores them for a local folder).
DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")

# Quantizers whose indices are not one token per grid cell (neither head handles them).
MULTI_TOKEN_QUANTIZERS = ("residual", "multiscale")


# diffusers' custom-code loading: model_index.json names fullvq's classes as [MODULE_FILE stem, class], and the
# file (in the folder and in each fullvq component's folder) imports them from the installed fullvq package.
MODULE_FILE = "fullvq_classes.py"
_MODULE_TEXT = '''"""Lets diffusers load this folder: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).

The classes live in the fullvq package (pip install fullvq); this file only names them.
"""
try:
    from fullvq import FullVQGPT, FullVQPipeline, FVQModel, LatentFlowPipeline  # noqa: F401
except ImportError as error:
    raise ImportError(f"this folder holds fullvq models; install fullvq to load it ({error})") from error
'''


def _normalise_name(name: str) -> str:
    return " ".join(name.split()).casefold()


class ClassConditionalPipeline(DiffusionPipeline):
    """Base of fullvq's pipelines: subclasses register their modules, call ``_set_labels`` and
    define ``num_classes``; ``_component_folders`` names the folders a hub download needs."""

    _component_folders: tuple[str, ...] = ()
    # The settings of this kind of pipeline's sampling, beside guidance_scale (their defaults are
    # those of __call__): what `fullvq sample` and gFID pass on, and refuse for the other kind.
    sampling_settings: tuple[str, ...] = ()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained``, then the folder's model card (``README.md``, see :mod:`fullvq.cards`);
        a card already there keeps the run facts a job recorded in it."""
        from fullvq.cards import write_model_card

        super().save_pretrained(save_directory, *args, **kwargs)
        write_model_card(save_directory)

    def save_config(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Write ``model_index.json`` and, beside it and in each fullvq component's folder, the module file
        through which ``DiffusionPipeline.from_pretrained`` finds fullvq's classes."""
        folders = [save_directory, *(os.path.join(save_directory, name) for name in self._fullvq_components())]
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, MODULE_FILE), "w") as file:
                file.write(_MODULE_TEXT)
        return super().save_config(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """``model_index.json``'s text: diffusers' own, with fullvq's classes named through ``MODULE_FILE``, and
        without the local path the pipeline was loaded from (``_name_or_path``)."""
        index = json.loads(super().to_json_string())
        index.pop("_name_or_path", None)
        stem = MODULE_FILE.removesuffix(".py")
        index["_class_name"] = [stem, type(self).__name__]
        for name in self._fullvq_components():
            index[name] = [stem, index[name][1]]
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def _fullvq_components(self) -> list[str]:
        """Components whose class comes from fullvq (diffusers' own schedulers and models need no module file)."""
        return [name for name in self.components if str(self.config[name][0]).split(".")[0] == "fullvq"]

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``model_index.json`` as fullvq reads it: fullvq's classes by their current module, so loading through a
        fullvq class never runs the folder's module file (and folders written before it existed load too)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][-1]
        for name, value in config.items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and \
                    (value[0] == MODULE_FILE.removesuffix(".py") or value[0].split(".")[0] == "fullvq"):
                config[name] = [_fullvq_class(value[1]).__module__, value[1]]
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by ``save_pretrained``, or a hub id with the same layout.

        ``kwargs`` are diffusers' (``dtype``, ``device_map``, ``revision``, ``cache_dir``, ``token``, ...).
        A missing local folder, or one lacking a component's weights, is a ``FileNotFoundError`` saying so.
        """
        pretrained_model_name_or_path = local_folder_or_hub_id(pretrained_model_name_or_path, "pipeline",
                                                               cache_dir=kwargs.get("cache_dir"))
        if not os.path.isdir(pretrained_model_name_or_path):
            # diffusers' own download refuses component classes from outside diffusers/transformers
            # unless the repo ships their code, so fetch the folder here and load it locally.
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path),
                allow_patterns=[cls.config_name, *(f"{folder}/*" for folder in cls._component_folders)],
                **{key: kwargs[key] for key in DOWNLOAD_KWARGS if key in kwargs},
            )
        for component in cls._component_folders:
            if component != "scheduler":  # a scheduler is settings only
                check_saved_folder(os.path.join(pretrained_model_name_or_path, component), component)
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
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(f"class_labels must hold integer class ids, got a {labels.dtype} tensor")
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, (int, str, np.integer)):
            labels = [labels]
        elif not isinstance(labels, (list, tuple)):
            raise TypeError(f"class_labels={labels!r} must be a class id (int), a class name, or a list of them; "
                            f"got {type(labels).__name__}")
        ids = [self._label_id(label) for label in labels]
        if not ids:
            raise ValueError("class_labels is empty; pass at least one class id or name")
        return ids

    def _label_id(self, label) -> int:
        if isinstance(label, str):
            return self._name_to_id(label)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise TypeError(f"class_labels holds {label!r}: each label must be an int id or a class name, got "
                            f"{type(label).__name__}")
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
                    generator, guidance_scale: float) -> list[list[int]]:
        """Validate the arguments both pipelines share, each error naming its argument; returns the
        label ids in batches."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} must be one of {OUTPUT_TYPES}")
        for name, count in (("num_images_per_label", num_images_per_label), ("batch_size", batch_size)):
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
                raise TypeError(f"{name}={count!r} must be an int, got {type(count).__name__}")
            if count < 1:
                raise ValueError(f"{name}={count} must be >= 1")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1 = no guidance)")
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


def _fullvq_class(name: str) -> type:
    import fullvq

    found = getattr(fullvq, name, None)
    if not isinstance(found, type):
        raise ValueError(f"model_index.json names a fullvq class {name!r} that this fullvq does not have; "
                         "upgrade fullvq (pip install -U fullvq)")
    return found


def class_name_of(index: dict) -> str | None:
    """The pipeline class ``model_index.json`` names, written either way (``"Name"`` or ``[module, "Name"]``)."""
    name = index.get("_class_name")
    return name[-1] if isinstance(name, list) else name


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
