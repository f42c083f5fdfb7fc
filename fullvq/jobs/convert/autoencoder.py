"""Taming-style autoencoders (LlamaGen's and VQGAN-LC's layouts) -> diffusers' ``Encoder`` / ``Decoder``
as ``FVQModel`` holds them: the part every tokenizer converter shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import ConversionError, KeyMapping, indices_of, shape_of

# LlamaGen and VQGAN-LC fix these; they are not stored in the checkpoints.
NORM_GROUPS = 32


@dataclass(frozen=True)
class AutoencoderLayout:
    """Where a taming-style autoencoder keeps its blocks."""

    down: str  # encoder levels: encoder.{down}.{level}
    resnet: str  # resnets within a level: .{resnet}.{j}
    mid: tuple[str, str, str]  # resnet, attention, resnet
    up: str  # decoder levels: decoder.{up}.{index}
    up_by_level: bool  # index = level (taming); else = position, lowest resolution first (LlamaGen)


LLAMAGEN_LAYOUT = AutoencoderLayout("conv_blocks", "res", ("mid.0", "mid.1", "mid.2"), "conv_blocks", False)
TAMING_LAYOUT = AutoencoderLayout("down", "block", ("mid.block_1", "mid.attn_1", "mid.block_2"), "up", True)


def _flatten_1x1(weight: torch.Tensor) -> torch.Tensor:
    # 1x1 convolutions of the original attention become diffusers' linear layers.
    return weight.flatten(1) if weight.ndim == 4 and weight.shape[2:] == (1, 1) else weight


def autoencoder_config(state: dict[str, torch.Tensor], layout: AutoencoderLayout, source: str) -> dict:
    levels = indices_of(state, f"encoder.{layout.down}.")
    if not levels or levels != list(range(len(levels))):
        raise ConversionError(f"the {source} checkpoint has encoder levels {levels}; expected 0, 1, ...")
    num_levels = len(levels)
    ch, in_channels = shape_of(state, "encoder.conv_in.weight", source)[:2]
    block_out = [shape_of(state, f"encoder.{layout.down}.{level}.{layout.resnet}.0.conv1.weight", source)[0]
                 for level in levels]
    if block_out[0] != ch:
        raise ConversionError(f"the {source} encoder has ch={ch} but its first level has {block_out[0]} channels "
                              "(ch_mult[0] != 1); fullvq's encoder needs ch_mult[0] = 1")
    layers = len(indices_of(state, f"encoder.{layout.down}.0.{layout.resnet}."))
    attention = [level for level in levels if f"encoder.{layout.down}.{level}.attn.0.q.weight" in state]

    up_levels = indices_of(state, f"decoder.{layout.up}.")
    if len(up_levels) != num_levels:
        raise ConversionError(f"the {source} decoder has {len(up_levels)} levels but the encoder {num_levels}; "
                              "fullvq needs encoder_ch_mult == decoder_ch_mult")
    for position in range(num_levels):
        level = num_levels - 1 - position
        index = level if layout.up_by_level else position
        prefix = f"decoder.{layout.up}.{index}"
        channels = shape_of(state, f"{prefix}.{layout.resnet}.0.conv1.weight", source)[0]
        resnets = len(indices_of(state, f"{prefix}.{layout.resnet}."))
        has_attention = f"{prefix}.attn.0.q.weight" in state
        if channels != block_out[level] or resnets != layers + 1 or has_attention != (level in attention):
            raise ConversionError(
                f"the {source} decoder level {level} ({channels} channels, {resnets} resnets, attention "
                f"{has_attention}) does not mirror the encoder ({block_out[level]} channels, {layers + 1} resnets, "
                f"attention {level in attention}); fullvq needs a mirrored decoder"
            )
    bad = [c for c in block_out if c % NORM_GROUPS]
    if bad:
        raise ConversionError(f"the {source} checkpoint has {bad} channels, not divisible by the 32 GroupNorm groups "
                              "both originals use; is it of that kind?")
    return dict(
        in_channels=in_channels,
        out_channels=shape_of(state, "decoder.conv_out.weight", source)[0],
        block_out_channels=tuple(block_out),
        layers_per_block=layers,
        latent_channels=shape_of(state, "encoder.conv_out.weight", source)[0],
        norm_num_groups=NORM_GROUPS,
        attention_levels=None if attention == [num_levels - 1] else tuple(attention),
    )


def _map_resnet(mapping: KeyMapping, target: str, source: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        mapping.module(f"{target}.{name}", f"{source}.{name}")
    if mapping.has(f"{source}.nin_shortcut.weight"):
        mapping.module(f"{target}.conv_shortcut", f"{source}.nin_shortcut")


def _map_attention(mapping: KeyMapping, target: str, source: str) -> None:
    mapping.module(f"{target}.group_norm", f"{source}.norm")
    for original, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        mapping.module(f"{target}.{name}", f"{source}.{original}", transform=_flatten_1x1)


def map_autoencoder(mapping: KeyMapping, layout: AutoencoderLayout, config: dict) -> None:
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



__all__ = ["AutoencoderLayout", "LLAMAGEN_LAYOUT", "TAMING_LAYOUT", "NORM_GROUPS", "autoencoder_config",
           "map_autoencoder"]
