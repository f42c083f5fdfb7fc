"""The ``convert`` job: an original checkpoint -> a fullvq ``save_pretrained`` folder (``fullvq convert``).

A tokenizer becomes an ``FVQModel`` folder, a GPT a ``FullVQGPT`` folder, and a GPT with its
tokenizer one ``FullVQPipeline`` folder with ImageNet's class names. Folders are written to a
temporary folder beside the output and renamed into place, so a failed conversion leaves nothing
behind.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ...cards import command_line, write_model_card
from ...io import atomic_folder
from ...pipelines.autoregressive import FullVQPipeline
from ...tokenizer.modeling import FVQModel
from .common import SOURCES, TOKENIZER_SOURCES, Conversion, ConversionError, load_checkpoint
from .fvq import convert_fvq
from .llamagen import convert_llamagen_gpt, convert_llamagen_vq, llamagen_grid
from .vqgan_lc import convert_vqgan_lc

CONVERTERS = {
    "llamagen-vq": convert_llamagen_vq,
    "fvq": convert_fvq,
    "vqgan-lc": convert_vqgan_lc,
    "llamagen-gpt": convert_llamagen_gpt,
}
_EXISTS_HINT = "choose another --output or pass --overwrite to replace it"


def imagenet_id2label() -> dict[int, str] | None:
    """ImageNet-1k class names (torchvision's weights metadata, shipped offline), or None without torchvision."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:
        return None
    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def convert_checkpoint(
    source: str,
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: str = "auto",
    image_size: int | None = None,
    l2_norm: bool | None = None,
    codebook: str | Path | None = None,
    grid_size: int | None = None,
    num_heads: int | None = None,
    num_classes: int | None = None,
    tokenizer_checkpoint: str | Path | None = None,
    tokenizer_source: str = "llamagen-vq",
    tokenizer_weights: str = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    bridge_heads: int | None = None,
    bridge_class: int | None = None,
    log=print,
) -> Path:
    """Convert ``checkpoint`` of kind ``source`` and write a fullvq folder at ``out``.

    ``bridge_heads`` and ``bridge_class`` concern FVQ checkpoints that hold the VQBridge (see
    :func:`convert_fvq`). ``image_size`` is the tokenizer's ``sample_size`` (a tokenizer alone: 256
    when not given). A GPT's token grid is taken from what the files record (its rotary table or
    caches; else ``grid_size``; else the paired tokenizer at a known image size); failing all of
    them the conversion is refused rather than guessed.

    A tokenizer becomes an :class:`FVQModel` folder, a GPT a :class:`FullVQGPT` folder, and a GPT with
    ``tokenizer_checkpoint`` (an original checkpoint of ``tokenizer_source``, or a fullvq tokenizer
    folder) a :class:`FullVQPipeline` folder with ImageNet's class names when it has 1000 classes.
    Returns ``out``.
    """
    if source not in CONVERTERS:
        raise ConversionError(f"unknown --from {source!r}; choose one of {', '.join(SOURCES)}")
    if tokenizer_checkpoint is not None and source != "llamagen-gpt":
        raise ConversionError("--tokenizer-checkpoint pairs a tokenizer with --from llamagen-gpt; "
                              f"convert a {source} tokenizer on its own")
    if tokenizer_source not in TOKENIZER_SOURCES:
        raise ConversionError(f"unknown --tokenizer-from {tokenizer_source!r}; choose one of {TOKENIZER_SOURCES}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; {_EXISTS_HINT}")

    bridge = {"bridge_heads": bridge_heads, "bridge_class": bridge_class}
    state, where, why = load_checkpoint(checkpoint, weights)
    log(f"read {len(state)} tensors from {checkpoint} ({_where(where)}: {why})")
    origin = f"{source} checkpoint {Path(checkpoint).name}"
    if source != "llamagen-gpt":
        conversion = _convert_tokenizer(state, source, image_size or 256, codebook, l2_norm, bridge)
        _report(conversion, log)
        model = conversion.model.to(dtype)
        _save(model, out, overwrite, origin)
        log(f"wrote FVQModel ({model.config.quantizer}, {model.config.codebook_size} x {model.config.codebook_dim}) "
            f"to {out}")
        return out

    tokenizer = None
    if tokenizer_checkpoint is not None:
        tokenizer, size_known = _load_tokenizer(tokenizer_checkpoint, tokenizer_source, tokenizer_weights, image_size,
                                                codebook, l2_norm, log, bridge)
        grid_size = _paired_grid(state, tokenizer, grid_size, size_known, log)
    conversion = convert_llamagen_gpt(state, grid_size=grid_size, num_heads=num_heads, num_classes=num_classes)
    _report(conversion, log)
    gpt = conversion.model.to(dtype)
    if tokenizer is None:
        _save(gpt, out, overwrite, origin)
        log(f"wrote FullVQGPT ({gpt.config.num_hidden_layers} layers, width {gpt.config.hidden_size}, grid "
            f"{gpt.config.grid_size}) to {out}")
        return out
    origin += f" + tokenizer {Path(tokenizer_checkpoint).name}"
    _save_pipeline(tokenizer.to(dtype), gpt, out, overwrite, log, origin)
    return out


def _save(model, out: Path, overwrite: bool, origin: str) -> None:
    """``model.save_pretrained`` into ``out`` (all at once), then its model card naming what it came from."""
    with atomic_folder(out, overwrite=overwrite, hint=_EXISTS_HINT) as staging:
        model.save_pretrained(staging)
    write_model_card(out, command=command_line(), source=origin, license="other")


def _save_pipeline(tokenizer: FVQModel, gpt, out: Path, overwrite: bool, log, origin: str) -> None:
    """Tokenizer + GPT as one ``FullVQPipeline`` folder, with ImageNet's names for 1000 classes."""
    id2label = imagenet_id2label() if gpt.config.num_classes == 1000 else None
    if id2label is None:
        log("  note: no class names recorded (they are ImageNet's only for 1000 classes, from torchvision)")
    try:
        pipeline = FullVQPipeline(tokenizer=tokenizer, gpt=gpt, id2label=id2label)
    except ValueError as error:
        raise ConversionError(f"the GPT and the tokenizer do not fit together: {error}") from None
    _save(pipeline, out, overwrite, origin)
    log(f"wrote FullVQPipeline (tokenizer + GPT{' + ImageNet id2label' if id2label else ''}) to {out}")


def _load_tokenizer(path: str | Path, source: str, weights: str, image_size: int | None, codebook,
                    l2_norm: bool | None, log, bridge: dict | None = None) -> tuple[FVQModel, bool]:
    """The paired tokenizer, and whether its image size is known (a fullvq folder, or ``image_size``)."""
    path = Path(path)
    if path.is_dir():  # an already converted (or trained) fullvq tokenizer folder
        log(f"tokenizer: fullvq folder {path}")
        return FVQModel.from_pretrained(path).eval(), True
    state, where, why = load_checkpoint(path, weights)
    log(f"tokenizer: read {len(state)} tensors from {path} ({_where(where)}: {why})")
    conversion = _convert_tokenizer(state, source, image_size or 256, codebook, l2_norm, bridge)
    _report(conversion, log)
    return conversion.model, image_size is not None


def _paired_grid(state, tokenizer: FVQModel, grid_size: int | None, size_known: bool, log) -> int:
    """The GPT's grid side when paired with ``tokenizer``: what the GPT records or ``grid_size`` (then
    the tokenizer's unknown image size follows from it), else the tokenizer's grid at its known size."""
    grid = tokenizer.latent_grid()
    if grid[0] != grid[1]:
        raise ConversionError(f"the tokenizer's latent grid {grid} is not square, as LlamaGen's is")
    side = grid_size or llamagen_grid(state)[0]
    factor = tokenizer.downsample_factor
    if side is None:
        if not size_known:
            raise ConversionError("neither the GPT checkpoint nor the tokenizer checkpoint records the image size; "
                                  "pass --resolution 256 or 384 (or --grid-size 16 or 24)")
        log(f"  note: grid {grid[0]}x{grid[0]} taken from the tokenizer at sample_size={tokenizer.config.sample_size}")
        return grid[0]
    if not size_known:
        tokenizer.register_to_config(sample_size=side * factor)
        log(f"  note: tokenizer sample_size={side * factor}, from the GPT's {side}x{side} grid and the tokenizer's "
            f"{factor}x downsampling")
    return side


def _convert_tokenizer(state, source: str, image_size: int, codebook, l2_norm: bool | None,
                       bridge: dict | None = None) -> Conversion:
    if source == "vqgan-lc":
        return convert_vqgan_lc(state, image_size=image_size, codebook=codebook)
    options = {} if l2_norm is None else {"l2_norm": l2_norm}
    if source == "fvq":
        options.update({key: value for key, value in (bridge or {}).items() if value is not None})
    return CONVERTERS[source](state, image_size=image_size, **options)


def _where(where: str) -> str:
    return "the file's own dict" if where == "root" else f"state dict under {where!r}"


def _report(conversion: Conversion, log) -> None:
    groups = Counter(conversion.dropped.values())
    mapped_sources = len(set(conversion.mapped.values()))
    log(f"  mapped {mapped_sources} original tensors onto {len(conversion.mapped)} fullvq weights"
        + "".join(f"; dropped {count} ({reason})" for reason, count in groups.items()))
    for note in conversion.notes:
        log(f"  note: {note}")


__all__ = ["CONVERTERS", "convert_checkpoint", "imagenet_id2label"]
