"""Released LlamaGen / FVQ / VQGAN-LC checkpoints -> fullvq ``save_pretrained`` folders.

``fullvq convert --from llamagen-vq|llamagen-gpt|fvq|vqgan-lc CHECKPOINT --out DIR``

Every tensor of the original state dict is either mapped, by name and checked by shape, onto a
fullvq weight or dropped by name because inference does not use it (discriminator, LPIPS, usage
counters, KV caches); anything else is an error that lists the keys. The converted model computes
what the original architecture computes with the same weights:

- ``llamagen-vq``: LlamaGen's ``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``): taming-style
  encoder/decoder under ``encoder.conv_blocks.{level}.res|attn|downsample`` and
  ``decoder.conv_blocks.{i}`` (lowest resolution first), ``mid.0-2``, 1x1-conv attention
  (``q, k, v, proj_out``), ``quantize.embedding.weight`` compared on the unit sphere (l2-norm).
- ``fvq``: FVQ's tokenizers on the LlamaGen ``VQModel`` layout. Released files are "in VQGAN
  format": the mapped codebook C_hat baked into ``quantize.embedding.weight`` (e.g. 16384 x 256),
  searched by plain L2 -> a plain ``vq`` quantizer. Training checkpoints that still hold the bridge
  (``quantize.qbridge.*``, older ones ``quantize.embedding_monitor.*``) -> the ``fvq`` quantizer
  with ``layout="square"`` (the official code views the codebook as a sqrt(K) x sqrt(K) image: timm
  ``PatchEmbed`` ``x_embedder``, ViT ``blocks``, ``final_layer`` + unpatchify), so indices match.
  Its DiT-style bridge (``pos_embed``, adaLN-Zero modulated by a fixed class embedding) folds
  exactly into ``norm_affine`` LayerNorms, gated output projections and ``position_embedding``.
- ``vqgan-lc``: VQGAN-LC's ``VQModel`` (``vqgan-gpt-lc/models/models_vq.py``): taming's
  encoder/decoder (``encoder.down.{level}.block|attn``, ``decoder.up.{level}``, ``mid.block_1``,
  ``attn_1``, ``block_2``), the frozen feature codebook ``tok_embeddings.weight`` (N x 768) and the
  linear projector ``codebook_projection`` (768 -> embed_dim) -> fullvq's ``lc`` quantizer.
- ``llamagen-gpt``: LlamaGen's class-to-image ``Transformer`` (``autoregressive/models/gpt.py``) ->
  :class:`~fullvq.generator.gpt.FullVQGPT` (transformers' Llama). The fused ``wqkv`` is split and
  the query/key rows are permuted from LlamaGen's interleaved rotary pairs to Llama's rotate-half
  pairs; the class prefix gets cos = sin = 0, as LlamaGen's ``freqs_cis`` table gives it
  (``prefix_rotation="zero"``).

With ``--tokenizer-checkpoint`` a GPT and its tokenizer are written as one
:class:`~fullvq.pipelines.autoregressive.FullVQPipeline` folder with ImageNet's class names.
Output folders are written to a temporary folder beside ``--out`` and renamed into place, so a
failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fullvq.generator.gpt import GPT_SIZES, FullVQGPT, FullVQGPTConfig
from fullvq.tokenizer.modeling import FVQModel

SOURCES = ("llamagen-vq", "llamagen-gpt", "fvq", "vqgan-lc")
TOKENIZER_SOURCES = ("llamagen-vq", "fvq", "vqgan-lc")

# Where training scripts keep the model's state dict, in the order "auto" tries them (EMA first, as
# LlamaGen's reconstruction script does).
STATE_DICT_KEYS = ("ema", "model", "module", "state_dict")
# Prefixes added by DDP and torch.compile when a wrapped model's state dict is saved.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# LlamaGen fixes these; they are not stored in its checkpoints.
LLAMAGEN_NORM_GROUPS = 32
LLAMAGEN_ROPE_THETA = 10000.0
LLAMAGEN_NORM_EPS = 1e-5
# Head counts of LlamaGen's GPT widths (c2i sizes from GPT_SIZES, plus its t2i 1B and 7B).
LLAMAGEN_HEADS = {width: heads for _, width, heads in GPT_SIZES.values()} | {2048: 32, 4096: 32}


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the offending keys and the fix."""


@dataclass
class Conversion:
    """A converted model and the account of every original key.

    uses: original key -> how many times it was consumed (mapped or dropped); exactly 1 for every key
        of a successful conversion.
    mapped: fullvq key -> the original key it came from.
    dropped: original key -> why it was not needed.
    notes: what the user should know (assumptions, appended rows).
    """

    model: torch.nn.Module
    uses: Counter
    mapped: dict[str, str]
    dropped: dict[str, str]
    notes: list[str] = field(default_factory=list)


class _Mapping:
    """Hands out the original tensors by name, each at most once, and collects fullvq's weights."""

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        self.state = state
        self.source = source
        self.uses: Counter = Counter()
        self.target: dict[str, torch.Tensor] = {}
        self.mapped: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.missing: list[str] = []
        self.notes: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        if self.uses[key]:
            raise RuntimeError(f"converter bug: original key {key} consumed twice")
        self.uses[key] += 1
        return self.state[key]

    def put(self, target: str, tensor: torch.Tensor | None, source: str) -> None:
        if tensor is not None:
            self.target[target] = tensor
            self.mapped[target] = source

    def copy(self, target: str, source: str, transform=None) -> None:
        tensor = self.take(source)
        if tensor is not None and transform is not None:
            tensor = transform(tensor)
        self.put(target, tensor, source)

    def module(self, target: str, source: str, params: tuple[str, ...] = ("weight", "bias"), transform=None) -> None:
        for name in params:
            self.copy(f"{target}.{name}", f"{source}.{name}", transform if name == "weight" else None)

    def drop(self, pattern: str, reason: str) -> None:
        """Drop every not yet consumed key matching the regular expression ``pattern``."""
        for key in self.state:
            if not self.uses[key] and re.fullmatch(pattern, key):
                self.uses[key] += 1
                self.dropped[key] = reason

    def finish(self, model: torch.nn.Module) -> Conversion:
        """Check names and shapes against ``model``, load the weights, or raise listing every problem."""
        expected = model.state_dict()
        unknown = [key for key in self.state if not self.uses[key]]
        unmapped = [key for key in expected if key not in self.target]
        mismatched = [
            f"{self.mapped[key]} {tuple(tensor.shape)} -> {key} {tuple(expected[key].shape)}"
            for key, tensor in self.target.items()
            if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
        ]
        extra = [key for key in self.target if key not in expected]
        problems = []
        if self.missing:
            problems.append(f"missing keys {_listing(self.missing)}")
        if unknown:
            problems.append(f"unknown keys {_listing(unknown)}")
        if mismatched:
            problems.append(f"shape mismatches {_listing(mismatched)}")
        if extra:  # the original has parts the inferred fullvq model lacks
            problems.append(f"keys with no place in the fullvq model {_listing([self.mapped[k] for k in extra])}")
        if unmapped and not self.missing:
            problems.append(f"fullvq weights with no original {_listing(unmapped)}")
        if problems:
            raise ConversionError(
                f"this is not a complete {self.source} checkpoint of the expected architecture: "
                + "; ".join(problems)
                + f"; check that --from {self.source} is the right kind and the file is not truncated or edited"
            )
        dtype = next(iter(expected.values())).dtype
        model.load_state_dict({key: tensor.to(dtype) for key, tensor in self.target.items()}, strict=True)
        return Conversion(model.eval(), self.uses, self.mapped, self.dropped, self.notes)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """Read a ``.pt``/``.pth`` checkpoint with ``weights_only=True`` (no code runs).

    Args:
        weights: which state dict to take: ``"auto"`` (the first of ``ema``, ``model``, ``module``,
            ``state_dict`` present, else the file's dict itself), one of those keys, or ``"root"``.

    Returns:
        ``(state_dict, where)`` with DDP / torch.compile prefixes removed; ``where`` names the key used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Training scripts store their argparse.Namespace beside the weights; it holds plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{path} cannot be read as a PyTorch checkpoint with weights_only=True ({first_line}); "
            "it is truncated, not a torch.save file, or holds objects other than tensors and plain values"
        ) from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    if weights == "auto":
        where = next((key for key in STATE_DICT_KEYS if isinstance(obj.get(key), dict)), "root")
    elif weights == "root" or isinstance(obj.get(weights), dict):
        where = weights
    else:
        found = [key for key, value in obj.items() if isinstance(value, dict)]
        raise ConversionError(f"{path} has no state dict under {weights!r}; its dict entries are {found}")
    state = obj if where == "root" else obj[where]
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        hint = (f"; its entries {[k for k in STATE_DICT_KEYS if k in obj] or sorted(map(str, obj))[:8]} "
                "may hold the weights: pass --weights KEY") if where == "root" else ""
        raise ConversionError(f"the state dict in {path} ({where}) has entries that are not tensors: "
                              f"{_listing(not_tensors)}{hint}")
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state), where


def detect_source(state: dict[str, torch.Tensor]) -> str | None:
    """The checkpoint family a state dict's names belong to: llamagen-vq (also FVQ's VQGAN format),
    llamagen-gpt, vqgan-lc, fullvq, or None."""
    keys = list(state)
    if any(re.fullmatch(r"layers\.\d+\.attention\.wqkv\.weight", key) for key in keys):
        return "llamagen-gpt"
    if any(key.startswith("encoder.conv_blocks.") for key in keys):
        return "llamagen-vq"
    if any(key.startswith("encoder.down.") for key in keys):
        return "vqgan-lc"
    if any(key.startswith("encoder.down_blocks.") for key in keys):
        return "fullvq"
    return None


_FAMILY = {"llamagen-vq": "llamagen-vq", "fvq": "llamagen-vq", "vqgan-lc": "vqgan-lc", "llamagen-gpt": "llamagen-gpt"}


def _check_family(state: dict[str, torch.Tensor], source: str) -> None:
    found = detect_source(state)
    if found == _FAMILY[source]:
        return
    if found is None:
        raise ConversionError(
            f"the checkpoint holds none of the keys of a {source} checkpoint (its first keys: "
            f"{_listing(list(state), 6)}); check --from and --weights"
        )
    if found == "fullvq":
        raise ConversionError("the checkpoint already uses fullvq's names; load it with FVQModel instead of converting")
    hint = "llamagen-vq or fvq" if found == "llamagen-vq" else found
    raise ConversionError(f"the checkpoint looks like a {found} checkpoint, not {source}; use --from {hint}")


def _shape(state: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"the {source} checkpoint lacks {key}, which fixes the architecture; "
                              "is the file complete and of that kind?")
    return tuple(state[key].shape)


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``{prefix}{i}.``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


# --------------------------------------------------------------------------------------------------
# Autoencoders (LlamaGen and taming / VQGAN-LC layouts) -> diffusers' Encoder / Decoder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a taming-style autoencoder keeps its blocks."""

    down: str  # encoder levels: encoder.{down}.{level}
    resnet: str  # resnets within a level: .{resnet}.{j}
    mid: tuple[str, str, str]  # resnet, attention, resnet
    up: str  # decoder levels: decoder.{up}.{index}
    up_by_level: bool  # index = level (taming); else = position, lowest resolution first (LlamaGen)


LLAMAGEN_LAYOUT = _Layout("conv_blocks", "res", ("mid.0", "mid.1", "mid.2"), "conv_blocks", False)
TAMING_LAYOUT = _Layout("down", "block", ("mid.block_1", "mid.attn_1", "mid.block_2"), "up", True)


def _flatten_1x1(weight: torch.Tensor) -> torch.Tensor:
    # 1x1 convolutions of the original attention become diffusers' linear layers.
    return weight.flatten(1) if weight.ndim == 4 and weight.shape[2:] == (1, 1) else weight


def _autoencoder_config(state: dict[str, torch.Tensor], layout: _Layout, source: str) -> dict:
    levels = _indices(state, f"encoder.{layout.down}.")
    if not levels or levels != list(range(len(levels))):
        raise ConversionError(f"the {source} checkpoint has encoder levels {levels}; expected 0, 1, ...")
    num_levels = len(levels)
    ch, in_channels = _shape(state, "encoder.conv_in.weight", source)[:2]
    block_out = [_shape(state, f"encoder.{layout.down}.{level}.{layout.resnet}.0.conv1.weight", source)[0]
                 for level in levels]
    if block_out[0] != ch:
        raise ConversionError(f"the {source} encoder has ch={ch} but its first level has {block_out[0]} channels "
                              "(ch_mult[0] != 1); fullvq's encoder needs ch_mult[0] = 1")
    layers = len(_indices(state, f"encoder.{layout.down}.0.{layout.resnet}."))
    attention = [level for level in levels if f"encoder.{layout.down}.{level}.attn.0.q.weight" in state]

    up_levels = _indices(state, f"decoder.{layout.up}.")
    if len(up_levels) != num_levels:
        raise ConversionError(f"the {source} decoder has {len(up_levels)} levels but the encoder {num_levels}; "
                              "fullvq needs encoder_ch_mult == decoder_ch_mult")
    for position in range(num_levels):
        level = num_levels - 1 - position
        index = level if layout.up_by_level else position
        prefix = f"decoder.{layout.up}.{index}"
        channels = _shape(state, f"{prefix}.{layout.resnet}.0.conv1.weight", source)[0]
        resnets = len(_indices(state, f"{prefix}.{layout.resnet}."))
        has_attention = f"{prefix}.attn.0.q.weight" in state
        if channels != block_out[level] or resnets != layers + 1 or has_attention != (level in attention):
            raise ConversionError(
                f"the {source} decoder level {level} ({channels} channels, {resnets} resnets, attention "
                f"{has_attention}) does not mirror the encoder ({block_out[level]} channels, {layers + 1} resnets, "
                f"attention {level in attention}); fullvq needs a mirrored decoder"
            )
    bad = [c for c in block_out if c % LLAMAGEN_NORM_GROUPS]
    if bad:
        raise ConversionError(f"the {source} checkpoint has {bad} channels, not divisible by the 32 GroupNorm groups "
                              "both originals use; is it of that kind?")
    return dict(
        in_channels=in_channels,
        out_channels=_shape(state, "decoder.conv_out.weight", source)[0],
        block_out_channels=tuple(block_out),
        layers_per_block=layers,
        latent_channels=_shape(state, "encoder.conv_out.weight", source)[0],
        norm_num_groups=LLAMAGEN_NORM_GROUPS,
        attention_levels=None if attention == [num_levels - 1] else tuple(attention),
    )


def _map_resnet(mapping: _Mapping, target: str, source: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        mapping.module(f"{target}.{name}", f"{source}.{name}")
    if mapping.has(f"{source}.nin_shortcut.weight"):
        mapping.module(f"{target}.conv_shortcut", f"{source}.nin_shortcut")


def _map_attention(mapping: _Mapping, target: str, source: str) -> None:
    mapping.module(f"{target}.group_norm", f"{source}.norm")
    for original, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        mapping.module(f"{target}.{name}", f"{source}.{original}", transform=_flatten_1x1)


def _map_autoencoder(mapping: _Mapping, layout: _Layout, config: dict) -> None:
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    attention = {levels - 1} if config["attention_levels"] is None else set(config["attention_levels"])
    mapping.module("encoder.conv_in", "encoder.conv_in")
    for level in range(levels):
        source, target = f"encoder.{layout.down}.{level}", f"encoder.down_blocks.{level}"
        for j in range(layers):
            _map_resnet(mapping, f"{target}.resnets.{j}", f"{source}.{layout.resnet}.{j}")
            if level in attention:
                _map_attention(mapping, f"{target}.attentions.{j}", f"{source}.attn.{j}")
        if level != levels - 1:
            mapping.module(f"{target}.downsamplers.0.conv", f"{source}.downsample.conv")
    for part in ("encoder", "decoder"):
        first, attn, second = layout.mid
        _map_resnet(mapping, f"{part}.mid_block.resnets.0", f"{part}.{first}")
        _map_attention(mapping, f"{part}.mid_block.attentions.0", f"{part}.{attn}")
        _map_resnet(mapping, f"{part}.mid_block.resnets.1", f"{part}.{second}")
        mapping.module(f"{part}.conv_norm_out", f"{part}.norm_out")
        mapping.module(f"{part}.conv_out", f"{part}.conv_out")
    mapping.module("decoder.conv_in", "decoder.conv_in")
    for position in range(levels):
        level = levels - 1 - position
        source = f"decoder.{layout.up}.{level if layout.up_by_level else position}"
        target = f"decoder.up_blocks.{position}"
        for j in range(layers + 1):
            _map_resnet(mapping, f"{target}.resnets.{j}", f"{source}.{layout.resnet}.{j}")
            if level in attention:
                _map_attention(mapping, f"{target}.attentions.{j}", f"{source}.attn.{j}")
        if level != 0:
            mapping.module(f"{target}.upsamplers.0.conv", f"{source}.upsample.conv")
    mapping.module("quant_conv", "quant_conv")
    mapping.module("post_quant_conv", "post_quant_conv")


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def convert_llamagen_vq(state: dict[str, torch.Tensor], *, image_size: int = 256, l2_norm: bool = True,
                        source: str = "llamagen-vq") -> Conversion:
    """LlamaGen's ``VQModel`` state dict -> :class:`FVQModel` with a plain ``vq`` quantizer.

    Args:
        image_size: the tokenizer's ``sample_size`` (not stored in the checkpoint; 256 for ImageNet).
        l2_norm: LlamaGen's ``codebook_l2_norm`` (True for its released VQ-8/VQ-16 tokenizers).
    """
    _check_family(state, source)
    extra = sorted(key for key in state if key.startswith("quantize.")
                   and key not in ("quantize.embedding.weight", "quantize.codebook_used"))
    if extra:
        hint = ("convert it with --from fvq" if _bridge_prefix(state) and source != "fvq"
                else "is it a checkpoint of another variant?")
        raise ConversionError(f"the checkpoint's quantizer holds {_listing(extra)} besides its codebook; {hint}")
    config = _autoencoder_config(state, LLAMAGEN_LAYOUT, source)
    codebook_size, codebook_dim = _shape(state, "quantize.embedding.weight", source)
    model = FVQModel(sample_size=image_size, quantizer="vq", codebook_size=codebook_size, codebook_dim=codebook_dim,
                     quantizer_kwargs={"l2_norm": l2_norm}, **config)
    mapping = _Mapping(state, source)
    _map_autoencoder(mapping, LLAMAGEN_LAYOUT, config)
    mapping.copy("quantize.embedding.weight", "quantize.embedding.weight")
    mapping.drop(r"quantize\.codebook_used", "usage counter of training")
    mapping.notes.append(f"codebook {codebook_size} x {codebook_dim}, l2_norm={l2_norm}, sample_size={image_size}")
    return mapping.finish(model)


BRIDGE_PREFIXES = ("quantize.qbridge", "quantize.embedding_monitor")  # the official name, and an older one
OFFICIAL_BRIDGE_HEADS = 4  # every official VQBridge size has 4 heads (width = 4 x head width)


def _bridge_prefix(state: dict[str, torch.Tensor]) -> str | None:
    return next((p for p in BRIDGE_PREFIXES if any(key.startswith(p + ".") for key in state)), None)


def convert_fvq(state: dict[str, torch.Tensor], *, image_size: int = 256, l2_norm: bool = False,
                bridge_heads: int = OFFICIAL_BRIDGE_HEADS, bridge_class: int | None = None) -> Conversion:
    """An FVQ tokenizer -> :class:`FVQModel`.

    A file in VQGAN format (C_hat baked into ``quantize.embedding.weight``) gives a plain ``vq``
    quantizer; a checkpoint holding the VQBridge gives the ``fvq`` quantizer with the official
    ``"square"`` codebook layout, so the converted model's indices are the original's.

    Args:
        l2_norm: search on the unit sphere (FVQ's recipes search by plain L2).
        bridge_heads: attention heads of the bridge (not in the weights; the official sizes all use 4).
        bridge_class: DiT-style bridge only: the row of its class table that conditions it (default:
            the last row, the null class, when the table has several rows; else row 0).
    """
    prefix = _bridge_prefix(state)
    if prefix is None:
        return convert_llamagen_vq(state, image_size=image_size, l2_norm=l2_norm, source="fvq")
    _check_family(state, "fvq")
    source = "fvq"
    codebook_size, codebook_dim = _shape(state, "quantize.embedding.weight", source)
    width, channels, patch, patch_w = _shape(state, f"{prefix}.x_embedder.proj.weight", source)
    if channels != codebook_dim or patch != patch_w:
        raise ConversionError(f"{prefix}.x_embedder.proj.weight has shape {(width, channels, patch, patch_w)}; "
                              f"expected (width, {codebook_dim}, P, P) for a {codebook_size} x {codebook_dim} codebook")
    depth = len(_indices(state, f"{prefix}.blocks."))
    hidden = _shape(state, f"{prefix}.blocks.0.mlp.fc1.weight", source)[0] if depth else 2 * width
    dit_style = f"{prefix}.pos_embed" in state or any("adaLN_modulation" in key for key in state)
    config = _autoencoder_config(state, LLAMAGEN_LAYOUT, source)
    try:
        model = FVQModel(sample_size=image_size, quantizer="fvq", codebook_size=codebook_size,
                         codebook_dim=codebook_dim, quantizer_kwargs=dict(
                             group_size=patch * patch, width=width, depth=depth, num_heads=bridge_heads,
                             mlp_ratio=hidden / width, layout="square", l2_norm=l2_norm, norm_affine=dit_style,
                             position_embedding=dit_style), **config)
    except ValueError as error:
        raise ConversionError(f"the checkpoint's VQBridge does not fit fullvq's fvq quantizer: {error}") from None
    mapping = _Mapping(state, source)
    _map_autoencoder(mapping, LLAMAGEN_LAYOUT, config)
    mapping.copy("quantize.base_codebook.weight", "quantize.embedding.weight")
    # timm's PatchEmbed convolution reads (channel, p, q); the square layout's tokens hold (p, q, channel).
    mapping.module("quantize.bridge.compress", f"{prefix}.x_embedder.proj",
                   transform=lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1))
    modulation = _bridge_modulation(mapping, prefix, depth, bridge_class) if dit_style else None
    for i in range(depth):
        source_block, target = f"{prefix}.blocks.{i}", f"quantize.bridge.blocks.{i}"
        gates = {}
        if modulation is not None:
            shift_msa, scale_msa, gates["attn"], shift_mlp, scale_mlp, gates["mlp"] = modulation[i].chunk(6)
            for norm, shift, scale in (("norm1", shift_msa, scale_msa), ("norm2", shift_mlp, scale_mlp)):
                mapping.put(f"{target}.{norm}.weight", 1 + scale, f"{source_block}.adaLN_modulation.1")
                mapping.put(f"{target}.{norm}.bias", shift, f"{source_block}.adaLN_modulation.1")
        mapping.module(f"{target}.attn.qkv", f"{source_block}.attn.qkv")
        _map_gated(mapping, f"{target}.attn.proj", f"{source_block}.attn.proj", gates.get("attn"))
        mapping.module(f"{target}.mlp.0", f"{source_block}.mlp.fc1")
        _map_gated(mapping, f"{target}.mlp.2", f"{source_block}.mlp.fc2", gates.get("mlp"))
    if modulation is not None:
        shift, scale = modulation[-1].chunk(2)
        mapping.put("quantize.bridge.norm.weight", 1 + scale, f"{prefix}.final_layer.adaLN_modulation.1")
        mapping.put("quantize.bridge.norm.bias", shift, f"{prefix}.final_layer.adaLN_modulation.1")
        embedding = mapping.take(f"{prefix}.pos_embed")
        if embedding is not None:
            mapping.put("quantize.bridge.position_embedding", embedding.reshape(-1, width), f"{prefix}.pos_embed")
    mapping.module("quantize.bridge.recover", f"{prefix}.final_layer.linear")
    mapping.drop(r"quantize\.codebook_used", "usage counter of training")
    mapping.notes.append(f"VQBridge{' (DiT-style, modulation folded)' if dit_style else ''}: codebook "
                         f"{codebook_size} x {codebook_dim}, P={patch} (G={patch * patch}), width {width}, depth "
                         f"{depth}, {bridge_heads} heads, square layout; sample_size={image_size}")
    return mapping.finish(model)


def _map_gated(mapping: _Mapping, target: str, source: str, gate: torch.Tensor | None) -> None:
    """A linear layer, its output scaled by ``gate`` (adaLN-Zero's gate folded into the weights)."""
    weight, bias = mapping.take(f"{source}.weight"), mapping.take(f"{source}.bias")
    if gate is not None and weight is not None and bias is not None:
        weight, bias = weight * gate[:, None], bias * gate
    mapping.put(f"{target}.weight", weight, f"{source}.weight")
    mapping.put(f"{target}.bias", bias, f"{source}.bias")


def _bridge_modulation(mapping: _Mapping, prefix: str, depth: int, label: int | None) -> list[torch.Tensor] | None:
    """The DiT-style bridge's adaLN outputs for its fixed condition: one (6 x width) vector per block,
    then the final layer's (2 x width). The condition is a class-table row (no timestep)."""
    table = mapping.take(f"{prefix}.y_embedder.embedding_table.weight")
    if table is None:
        return None  # reported as a missing key by finish()
    label = (len(table) - 1 if len(table) > 1 else 0) if label is None else label
    if not 0 <= label < len(table):
        raise ConversionError(f"bridge_class={label} is outside the bridge's class table [0, {len(table)})")
    condition = torch.nn.functional.silu(table[label].double())
    outputs = []
    for name in [f"blocks.{i}" for i in range(depth)] + ["final_layer"]:
        weight = mapping.take(f"{prefix}.{name}.adaLN_modulation.1.weight")
        bias = mapping.take(f"{prefix}.{name}.adaLN_modulation.1.bias")
        if weight is None or bias is None:
            return None
        outputs.append((weight.double() @ condition + bias.double()).float())
    return outputs


def convert_vqgan_lc(state: dict[str, torch.Tensor], *, image_size: int = 256,
                     codebook: torch.Tensor | str | Path | None = None) -> Conversion:
    """VQGAN-LC's ``VQModel`` state dict -> :class:`FVQModel` with the ``lc`` quantizer.

    Args:
        codebook: the frozen N x feature_dim codebook (tensor or file: VQGAN-LC's ``codebook-100K.pth``
            or ``fullvq init-codebook`` output), needed only when the checkpoint lacks
            ``tok_embeddings.weight``.
    """
    source = "vqgan-lc"
    _check_family(state, source)
    mapping = _Mapping(state, source)
    if "tok_embeddings.weight" in state:
        table = mapping.take("tok_embeddings.weight")
        if codebook is not None:
            mapping.notes.append("the checkpoint holds tok_embeddings.weight; the --codebook file was not used")
    elif codebook is not None:
        from fullvq.tokenizer.quantizers.projected import _read_codebook_file

        table = codebook if isinstance(codebook, torch.Tensor) else _read_codebook_file(Path(codebook))
    else:
        raise ConversionError("the vqgan-lc checkpoint lacks tok_embeddings.weight (its frozen codebook); pass the "
                              "codebook file it was trained with (e.g. codebook-100K.pth) with --codebook")
    if table.ndim != 2:
        raise ConversionError(f"the vqgan-lc codebook has shape {tuple(table.shape)}; expected (N, feature_dim)")
    codebook_dim = _shape(state, "quant_conv.weight", source)[0]
    if any(key.startswith("codebook_projection.0.") for key in state):
        raise ConversionError("this vqgan-lc checkpoint uses the MLP codebook projector (use_cblinear=2: "
                              "codebook_projection.0/.2); fullvq's lc quantizer has the linear one (use_cblinear=1)")
    if codebook_dim == 768:
        raise ConversionError("vqgan-lc with embed_dim=768 l2-normalises the encoder output but not the codebook, "
                              "which fullvq's quantizers do not do; only embed_dim != 768 converts exactly")
    config = _autoencoder_config(state, TAMING_LAYOUT, source)
    num_codes, feature_dim = table.shape
    if "codebook_projection.weight" in state:  # use_cblinear=1: C_hat = C W^T + b
        model = FVQModel(sample_size=image_size, quantizer="lc", codebook_size=num_codes, codebook_dim=codebook_dim,
                         quantizer_kwargs={"feature_dim": feature_dim}, **config)
        mapping.put("quantize.frozen_codebook", table, "tok_embeddings.weight")
        mapping.module("quantize.codebook_projection", "codebook_projection")
        mapping.notes.append(f"lc codebook {num_codes} x {feature_dim} -> {codebook_dim} (linear projector)")
    else:  # use_cblinear=0: the table is the codebook itself
        model = FVQModel(sample_size=image_size, quantizer="vq", codebook_size=num_codes, codebook_dim=codebook_dim,
                         **config)
        mapping.put("quantize.embedding.weight", table, "tok_embeddings.weight")
        mapping.notes.append(f"no projector: plain codebook {num_codes} x {feature_dim}")
    _map_autoencoder(mapping, TAMING_LAYOUT, config)
    mapping.drop(r"(discriminator|perceptual_loss)\..*", "training loss (discriminator / LPIPS)")
    mapping.drop(r"cluster_size|embed_avg", "EMA quantizer state of training")
    mapping.notes.append(f"sample_size={image_size}")
    return mapping.finish(model)


# --------------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------------


def interleaved_to_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Permute query/key projection rows from interleaved rotary pairs (dims 2j, 2j+1 of each head,
    LlamaGen / Meta's Llama) to rotate-half pairs (dims j, j + head_dim/2, transformers' Llama)."""
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def llamagen_freqs_cis(grid_size: int, head_dim: int, theta: float = LLAMAGEN_ROPE_THETA,
                       prefix_length: int = 1) -> torch.Tensor:
    """LlamaGen's 2D rotary table (1 + grid^2, head_dim/2, 2) of (cos, sin), zero at the class prefix."""
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim))
    angles = torch.outer(torch.arange(grid_size).float(), inv_freq)
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], -1)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(prefix_length, head_dim // 2, 2), table])


def convert_llamagen_gpt(state: dict[str, torch.Tensor], *, grid_size: int | None = None,
                         num_heads: int | None = None, num_classes: int | None = None) -> Conversion:
    """LlamaGen's class-to-image GPT state dict -> :class:`FullVQGPT`.

    Args:
        grid_size: token grid side (16 for 256 px, 24 for 384 px with VQ-16); read from ``freqs_cis``
            when the checkpoint has it, else required unless the default 16 is right.
        num_heads: attention heads; by default LlamaGen's for the width (768 -> 12, 1024 -> 16, ...).
        num_classes: class count; by default the class table's rows - 1 (the last row is the null class).
    """
    source = "llamagen-gpt"
    _check_family(state, source)
    if any(key.startswith("cls_embedding.cap_proj.") for key in state):
        raise ConversionError("this is a LlamaGen text-to-image GPT (cls_embedding.cap_proj); only class-to-image "
                              "GPTs convert to FullVQGPT")
    notes = []
    vocab_size, hidden_size = _shape(state, "tok_embeddings.weight", source)
    layers = _indices(state, "layers.")
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"the llamagen-gpt checkpoint has layers {layers}; expected 0, 1, ...")
    if num_heads is None:
        if hidden_size not in LLAMAGEN_HEADS:
            raise ConversionError(f"hidden size {hidden_size} is none of LlamaGen's GPT widths "
                                  f"{sorted(LLAMAGEN_HEADS)}; pass --num-heads")
        num_heads = LLAMAGEN_HEADS[hidden_size]
    if hidden_size % num_heads:
        raise ConversionError(f"hidden size {hidden_size} is not divisible by num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    qkv_rows = _shape(state, "layers.0.attention.wqkv.weight", source)[0]
    if qkv_rows != 3 * hidden_size:
        raise ConversionError(f"layers.0.attention.wqkv.weight has {qkv_rows} rows, not 3 x {hidden_size}: grouped "
                              "key/value heads (n_kv_head < n_head), which FullVQGPT does not have")
    if "freqs_cis" in state:
        positions = _shape(state, "freqs_cis", source)[0]
        side = math.isqrt(positions - 1)
        if side * side != positions - 1:
            raise ConversionError(f"freqs_cis has {positions} rows, not 1 class token + a square grid")
        if grid_size is not None and grid_size != side:
            raise ConversionError(f"grid_size={grid_size} but the checkpoint's freqs_cis is for a {side}x{side} grid")
        grid_size = side
    elif grid_size is None:
        grid_size = 16
        notes.append("grid 16x16 assumed (256 px with a 16x-downsampling tokenizer); pass --grid-size 24 for 384 px")
    class_rows = _shape(state, "cls_embedding.embedding_table.weight", source)[0]
    if num_classes is None:
        num_classes = class_rows - 1
    if class_rows not in (num_classes, num_classes + 1):
        raise ConversionError(f"cls_embedding.embedding_table.weight has {class_rows} rows for num_classes="
                              f"{num_classes}; expected {num_classes + 1} (the last is the null class)")
    config = FullVQGPTConfig(
        codebook_size=vocab_size, num_classes=num_classes, grid_size=grid_size, hidden_size=hidden_size,
        num_hidden_layers=len(layers), num_attention_heads=num_heads,
        intermediate_size=_shape(state, "layers.0.feed_forward.w1.weight", source)[0],
        rms_norm_eps=LLAMAGEN_NORM_EPS, rope_theta=LLAMAGEN_ROPE_THETA, prefix_rotation="zero",
    )
    model = FullVQGPT(config)
    mapping = _Mapping(state, source)
    mapping.notes.extend(notes)

    classes = mapping.take("cls_embedding.embedding_table.weight")
    if classes is not None and class_rows == num_classes:
        classes = torch.cat([classes, classes.new_zeros(1, hidden_size)])
        mapping.notes.append("the GPT was trained without class dropout (no null-class row): a zero null row was "
                             "appended; classifier-free guidance is meaningless, sample with guidance_scale=1")
    mapping.put("class_embedding.weight", classes, "cls_embedding.embedding_table.weight")
    mapping.copy("model.embed_tokens.weight", "tok_embeddings.weight")
    for i in layers:
        source_layer, target = f"layers.{i}", f"model.layers.{i}"
        qkv = mapping.take(f"{source_layer}.attention.wqkv.weight")
        if qkv is not None:
            if qkv.shape[0] != 3 * hidden_size:
                mapping.put(f"{target}.self_attn.q_proj.weight", qkv, f"{source_layer}.attention.wqkv.weight")
            else:
                q, k, v = qkv.split(hidden_size, dim=0)
                for name, tensor in (("q", interleaved_to_half(q, num_heads)), ("k", interleaved_to_half(k, num_heads)),
                                     ("v", v)):
                    mapping.put(f"{target}.self_attn.{name}_proj.weight", tensor,
                                f"{source_layer}.attention.wqkv.weight")
        mapping.copy(f"{target}.self_attn.o_proj.weight", f"{source_layer}.attention.wo.weight")
        for original, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            mapping.copy(f"{target}.mlp.{name}.weight", f"{source_layer}.feed_forward.{original}.weight")
        mapping.copy(f"{target}.input_layernorm.weight", f"{source_layer}.attention_norm.weight")
        mapping.copy(f"{target}.post_attention_layernorm.weight", f"{source_layer}.ffn_norm.weight")
    mapping.copy("model.norm.weight", "norm.weight")
    mapping.copy("lm_head.weight", "output.weight")
    if "freqs_cis" in state:
        table = mapping.take("freqs_cis")
        expected = llamagen_freqs_cis(grid_size, head_dim)
        if table.shape != expected.shape or not torch.allclose(table.float(), expected, atol=1e-4):
            raise ConversionError(f"the checkpoint's freqs_cis is not LlamaGen's 2D rotary table for a {grid_size}x"
                                  f"{grid_size} grid, head_dim={head_dim}, base {LLAMAGEN_ROPE_THETA:g}; "
                                  "FullVQGPT would rotate differently")
        mapping.dropped["freqs_cis"] = "rotary table, recomputed by GridRotaryEmbedding (checked equal)"
    mapping.drop(r"layers\.\d+\.attention\.kv_cache\.[kv]_cache|causal_mask", "sampling cache")
    return mapping.finish(model)


CONVERTERS = {
    "llamagen-vq": convert_llamagen_vq,
    "fvq": convert_fvq,
    "vqgan-lc": convert_vqgan_lc,
    "llamagen-gpt": convert_llamagen_gpt,
}


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------


def imagenet_id2label() -> dict[int, str] | None:
    """ImageNet-1k class names (torchvision's weights metadata, shipped offline), or None without torchvision."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:
        return None
    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def write_atomically(out: str | Path, write, overwrite: bool = False) -> Path:
    """Run ``write(folder)`` on a temporary folder beside ``out`` and rename it to ``out``.

    On any failure the temporary folder is removed and an existing ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            try:
                staging.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _load_tokenizer(path: str | Path, source: str, weights: str, image_size: int, codebook,
                    l2_norm: bool | None, log, bridge: dict | None = None) -> FVQModel:
    path = Path(path)
    if path.is_dir():  # an already converted (or trained) fullvq tokenizer folder
        log(f"tokenizer: fullvq folder {path}")
        return FVQModel.from_pretrained(path).eval()
    state, where = load_checkpoint(path, weights)
    log(f"tokenizer: read {len(state)} tensors from {path} ({_where(where)})")
    conversion = _convert_tokenizer(state, source, image_size, codebook, l2_norm, bridge)
    _report(conversion, log)
    return conversion.model


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


def convert_checkpoint(
    source: str,
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: str = "auto",
    image_size: int = 256,
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
    :func:`convert_fvq`).

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
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite to replace it")

    bridge = {"bridge_heads": bridge_heads, "bridge_class": bridge_class}
    state, where = load_checkpoint(checkpoint, weights)
    log(f"read {len(state)} tensors from {checkpoint} ({_where(where)})")
    if source != "llamagen-gpt":
        conversion = _convert_tokenizer(state, source, image_size, codebook, l2_norm, bridge)
        _report(conversion, log)
        model = conversion.model.to(dtype)
        write_atomically(out, model.save_pretrained, overwrite)
        log(f"wrote FVQModel ({model.config.quantizer}, {model.config.codebook_size} x {model.config.codebook_dim}) "
            f"to {out}")
        return out

    tokenizer = None
    if tokenizer_checkpoint is not None:
        tokenizer = _load_tokenizer(tokenizer_checkpoint, tokenizer_source, tokenizer_weights, image_size,
                                    codebook, l2_norm, log, bridge)
        tokenizer_grid = tokenizer.latent_grid()
        if tokenizer_grid[0] != tokenizer_grid[1]:
            raise ConversionError(f"the tokenizer's latent grid {tokenizer_grid} is not square, as LlamaGen's is")
        if grid_size is None and "freqs_cis" not in state:
            grid_size = tokenizer_grid[0]
    conversion = convert_llamagen_gpt(state, grid_size=grid_size, num_heads=num_heads, num_classes=num_classes)
    _report(conversion, log)
    gpt = conversion.model.to(dtype)
    if tokenizer is None:
        write_atomically(out, gpt.save_pretrained, overwrite)
        log(f"wrote FullVQGPT ({gpt.config.num_hidden_layers} layers, width {gpt.config.hidden_size}, grid "
            f"{gpt.config.grid_size}) to {out}")
        return out

    from fullvq.pipelines.autoregressive import FullVQPipeline

    id2label = imagenet_id2label() if gpt.config.num_classes == 1000 else None
    if id2label is None:
        log("  note: no class names recorded (they are ImageNet's only for 1000 classes, from torchvision)")
    try:
        pipeline = FullVQPipeline(tokenizer=tokenizer.to(dtype), gpt=gpt, id2label=id2label)
    except ValueError as error:
        raise ConversionError(f"the GPT and the tokenizer do not fit together: {error}") from None
    write_atomically(out, pipeline.save_pretrained, overwrite)
    log(f"wrote FullVQPipeline (tokenizer + GPT{' + ImageNet id2label' if id2label else ''}) to {out}")
    return out


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert an original LlamaGen / FVQ / VQGAN-LC checkpoint (.pt, read with weights_only=True) "
                    "into a fullvq save_pretrained folder. Example: --from llamagen-gpt c2i_L_256.pt "
                    "--tokenizer-checkpoint vq_ds16_c2i.pt --out llamagen-L (a FullVQPipeline folder).",
    )
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                        help="checkpoint kind: llamagen-vq (LlamaGen VQ-8/16), fvq (FVQ tokenizer: VQGAN format or "
                             "with its VQBridge), "
                             "vqgan-lc (VQGAN-LC tokenizer), llamagen-gpt (LlamaGen class-to-image GPT)")
    parser.add_argument("checkpoint", help="the original .pt / .pth checkpoint")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--weights", default="auto",
                        help="state dict to read: auto (ema, model, module, state_dict, else the file's dict), "
                             "one of those keys, or root")
    parser.add_argument("--image-size", type=int, default=256, help="tokenizer sample_size in pixels (default 256)")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--l2-norm", dest="l2_norm", action="store_true", default=None,
                      help="codebook search on the unit sphere (default for llamagen-vq)")
    norm.add_argument("--no-l2-norm", dest="l2_norm", action="store_false",
                      help="plain L2 codebook search (default for fvq)")
    parser.add_argument("--codebook", help="vqgan-lc: its frozen codebook file, when the checkpoint lacks "
                                           "tok_embeddings.weight")
    parser.add_argument("--grid-size", type=int, help="llamagen-gpt: token grid side (16 for 256 px, 24 for 384 px)")
    parser.add_argument("--num-heads", type=int,
                        help="llamagen-gpt: attention heads (default: LlamaGen's for the width)")
    parser.add_argument("--num-classes", type=int, help="llamagen-gpt: classes (default: class-table rows - 1)")
    parser.add_argument("--tokenizer-checkpoint",
                        help="llamagen-gpt: the tokenizer's checkpoint (or fullvq folder); writes a FullVQPipeline")
    parser.add_argument("--tokenizer-from", default="llamagen-vq", choices=TOKENIZER_SOURCES,
                        help="kind of --tokenizer-checkpoint (default llamagen-vq)")
    parser.add_argument("--tokenizer-weights", default="auto", help="--weights for the tokenizer checkpoint")
    parser.add_argument("--bridge-heads", type=int, default=None,
                        help="fvq with its VQBridge: attention heads of the bridge (default 4, as every official size)")
    parser.add_argument("--bridge-class", type=int, default=None,
                        help="fvq with a DiT-style VQBridge: class-table row that conditions it (default: the null "
                             "class, the last row)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def main(argv: list[str], prog: str = "fullvq convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        convert_checkpoint(
            args.source, args.checkpoint, args.out, weights=args.weights, image_size=args.image_size,
            l2_norm=args.l2_norm, codebook=args.codebook, grid_size=args.grid_size, num_heads=args.num_heads,
            num_classes=args.num_classes, tokenizer_checkpoint=args.tokenizer_checkpoint,
            tokenizer_source=args.tokenizer_from, tokenizer_weights=args.tokenizer_weights,
            dtype=getattr(torch, args.dtype), overwrite=args.overwrite, bridge_heads=args.bridge_heads,
            bridge_class=args.bridge_class,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "SOURCES",
    "ConversionError",
    "Conversion",
    "load_checkpoint",
    "detect_source",
    "convert_llamagen_vq",
    "convert_fvq",
    "BRIDGE_PREFIXES",
    "convert_vqgan_lc",
    "convert_llamagen_gpt",
    "convert_checkpoint",
    "interleaved_to_half",
    "llamagen_freqs_cis",
    "imagenet_id2label",
    "write_atomically",
]
