"""FVQ's tokenizers, on the LlamaGen ``VQModel`` layout.

Released files are "in VQGAN format": the mapped codebook C_hat baked into
``quantize.embedding.weight`` (e.g. 16384 x 256), searched by plain L2 -> a plain ``vq`` quantizer.
Training checkpoints that still hold the bridge (``quantize.qbridge.*``, older ones
``quantize.embedding_monitor.*``) -> the ``fvq`` quantizer with ``layout="square"`` (the official
code views the codebook as a sqrt(K) x sqrt(K) image: timm ``PatchEmbed`` ``x_embedder``, ViT
``blocks``, ``final_layer`` + unpatchify), so indices match. Its DiT-style bridge (``pos_embed``,
adaLN-Zero modulated by a fixed class embedding) folds exactly into ``norm_affine`` LayerNorms,
gated output projections and ``position_embedding``.
"""

from __future__ import annotations

import torch

from ...tokenizer.modeling import FVQModel
from .autoencoder import LLAMAGEN_LAYOUT, autoencoder_config, map_autoencoder
from .common import Conversion, ConversionError, KeyMapping, bridge_prefix, check_family, indices_of, shape_of
from .llamagen import convert_llamagen_vq

OFFICIAL_BRIDGE_HEADS = 4  # every official VQBridge size has 4 heads (width = 4 x head width)


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
    prefix = bridge_prefix(state)
    if prefix is None:
        return convert_llamagen_vq(state, image_size=image_size, l2_norm=l2_norm, source="fvq")
    check_family(state, "fvq")
    source = "fvq"
    if f"{prefix}.x_embedder.proj.weight" not in state:
        names = sorted({key[len(prefix) + 1:].split(".")[0] for key in state if key.startswith(prefix + ".")})
        raise ConversionError(
            f"unsupported FVQ variant: its bridge {prefix} holds {names}, not the transformer VQBridge "
            "(x_embedder, blocks, final_layer) of FVQ's paper and releases; ablation bridges such as FVQ's "
            "Qbridge-lin (a linear map) are not supported. Convert the released VQGAN-format file instead"
        )
    codebook_size, codebook_dim = shape_of(state, "quantize.embedding.weight", source)
    width, channels, patch, patch_w = shape_of(state, f"{prefix}.x_embedder.proj.weight", source)
    if channels != codebook_dim or patch != patch_w:
        raise ConversionError(f"{prefix}.x_embedder.proj.weight has shape {(width, channels, patch, patch_w)}; "
                              f"expected (width, {codebook_dim}, P, P) for a {codebook_size} x {codebook_dim} codebook")
    depth = len(indices_of(state, f"{prefix}.blocks."))
    hidden = shape_of(state, f"{prefix}.blocks.0.mlp.fc1.weight", source)[0] if depth else 2 * width
    dit_style = f"{prefix}.pos_embed" in state or any("adaLN_modulation" in key for key in state)
    config = autoencoder_config(state, LLAMAGEN_LAYOUT, source)
    try:
        model = FVQModel(sample_size=image_size, quantizer="fvq", codebook_size=codebook_size,
                         codebook_dim=codebook_dim, quantizer_kwargs=dict(
                             group_size=patch * patch, width=width, depth=depth, num_heads=bridge_heads,
                             mlp_ratio=hidden / width, layout="square", l2_norm=l2_norm, norm_affine=dit_style,
                             position_embedding=dit_style), **config)
    except ValueError as error:
        raise ConversionError(f"the checkpoint's VQBridge does not fit fullvq's fvq quantizer: {error}") from None
    mapping = KeyMapping(state, source)
    map_autoencoder(mapping, LLAMAGEN_LAYOUT, config)
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


def _map_gated(mapping: KeyMapping, target: str, source: str, gate: torch.Tensor | None) -> None:
    """A linear layer, its output scaled by ``gate`` (adaLN-Zero's gate folded into the weights)."""
    weight, bias = mapping.take(f"{source}.weight"), mapping.take(f"{source}.bias")
    if gate is not None and weight is not None and bias is not None:
        weight, bias = weight * gate[:, None], bias * gate
    mapping.put(f"{target}.weight", weight, f"{source}.weight")
    mapping.put(f"{target}.bias", bias, f"{source}.bias")


def _bridge_modulation(mapping: KeyMapping, prefix: str, depth: int, label: int | None) -> list[torch.Tensor] | None:
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



__all__ = ["convert_fvq", "OFFICIAL_BRIDGE_HEADS"]
