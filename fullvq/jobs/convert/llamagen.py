"""LlamaGen checkpoints: its ``VQModel`` tokenizer and its class-to-image GPT.

- ``llamagen-vq``: LlamaGen's ``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``): taming-style
  encoder/decoder under ``encoder.conv_blocks.{level}.res|attn|downsample`` and
  ``decoder.conv_blocks.{i}`` (lowest resolution first), ``mid.0-2``, 1x1-conv attention
  (``q, k, v, proj_out``), ``quantize.embedding.weight`` compared on the unit sphere (l2-norm).
- ``llamagen-gpt``: LlamaGen's class-to-image ``Transformer`` (``autoregressive/models/gpt.py``) ->
  :class:`~fullvq.generator.gpt.FullVQGPT` (transformers' Llama). The fused ``wqkv`` is split and
  the query/key rows are permuted from LlamaGen's interleaved rotary pairs to Llama's rotate-half
  pairs; the class prefix gets cos = sin = 0, as LlamaGen's ``freqs_cis`` table gives it
  (``prefix_rotation="zero"``).
"""

from __future__ import annotations

import math

import torch

from ...generator.gpt import GPT_SIZES, FullVQGPT, FullVQGPTConfig
from ...tokenizer.modeling import FVQModel
from .autoencoder import LLAMAGEN_LAYOUT, autoencoder_config, map_autoencoder
from .common import Conversion, ConversionError, KeyMapping, bridge_prefix, check_family, indices_of, listing, shape_of

LLAMAGEN_ROPE_THETA = 10000.0
LLAMAGEN_NORM_EPS = 1e-5
# Head counts of LlamaGen's GPT widths (c2i sizes from GPT_SIZES, plus its t2i 1B and 7B).
LLAMAGEN_HEADS = {width: heads for _, width, heads in GPT_SIZES.values()} | {2048: 32, 4096: 32}


def convert_llamagen_vq(state: dict[str, torch.Tensor], *, image_size: int = 256, l2_norm: bool = True,
                        source: str = "llamagen-vq") -> Conversion:
    """LlamaGen's ``VQModel`` state dict -> :class:`FVQModel` with a plain ``vq`` quantizer.

    Args:
        image_size: the tokenizer's ``sample_size`` (not stored in the checkpoint; 256 for ImageNet).
        l2_norm: LlamaGen's ``codebook_l2_norm`` (True for its released VQ-8/VQ-16 tokenizers).
    """
    check_family(state, source)
    extra = sorted(key for key in state if key.startswith("quantize.")
                   and key not in ("quantize.embedding.weight", "quantize.codebook_used"))
    if extra:
        hint = ("convert it with --from fvq" if bridge_prefix(state) and source != "fvq"
                else "is it a checkpoint of another variant?")
        raise ConversionError(f"the checkpoint's quantizer holds {listing(extra)} besides its codebook; {hint}")
    config = autoencoder_config(state, LLAMAGEN_LAYOUT, source)
    codebook_size, codebook_dim = shape_of(state, "quantize.embedding.weight", source)
    model = FVQModel(sample_size=image_size, quantizer="vq", codebook_size=codebook_size, codebook_dim=codebook_dim,
                     quantizer_kwargs={"l2_norm": l2_norm}, **config)
    mapping = KeyMapping(state, source)
    map_autoencoder(mapping, LLAMAGEN_LAYOUT, config)
    mapping.copy("quantize.embedding.weight", "quantize.embedding.weight")
    mapping.drop(r"quantize\.codebook_used", "usage counter of training")
    mapping.notes.append(f"codebook {codebook_size} x {codebook_dim}, l2_norm={l2_norm}, sample_size={image_size}")
    return mapping.finish(model)


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
        grid_size: token grid side (16 for 256 px, 24 for 384 px with VQ-16); read from the checkpoint
            where it records it (see :func:`llamagen_grid`), else required.
        num_heads: attention heads; by default LlamaGen's for the width (768 -> 12, 1024 -> 16, ...).
        num_classes: class count; by default the class table's rows - 1 (the last row is the null class).
    """
    source = "llamagen-gpt"
    check_family(state, source)
    if any(key.startswith("cls_embedding.cap_proj.") for key in state):
        raise ConversionError("this is a LlamaGen text-to-image GPT (cls_embedding.cap_proj); only class-to-image "
                              "GPTs convert to FullVQGPT")
    config, notes = _gpt_config(state, grid_size, num_heads, num_classes)
    mapping = KeyMapping(state, source)
    mapping.notes.extend(notes)
    hidden_size, num_heads = config.hidden_size, config.num_attention_heads
    classes = mapping.take("cls_embedding.embedding_table.weight")
    if classes is not None and len(classes) == config.num_classes:
        classes = torch.cat([classes, classes.new_zeros(1, hidden_size)])
        mapping.notes.append("the GPT was trained without class dropout (no null-class row): a zero null row was "
                             "appended; classifier-free guidance is meaningless, sample with guidance_scale=1")
    mapping.put("class_embedding.weight", classes, "cls_embedding.embedding_table.weight")
    mapping.copy("model.embed_tokens.weight", "tok_embeddings.weight")
    for i in range(config.num_hidden_layers):
        _map_layer(mapping, f"layers.{i}", f"model.layers.{i}", hidden_size, num_heads)
    mapping.copy("model.norm.weight", "norm.weight")
    mapping.copy("lm_head.weight", "output.weight")
    if "freqs_cis" in state:
        table = mapping.take("freqs_cis")
        side, head_dim = config.grid_size[0], hidden_size // num_heads
        expected = llamagen_freqs_cis(side, head_dim)
        if table.shape != expected.shape or not torch.allclose(table.float(), expected, atol=1e-4):
            raise ConversionError(f"the checkpoint's freqs_cis is not LlamaGen's 2D rotary table for a {side}x"
                                  f"{side} grid, head_dim={head_dim}, base {LLAMAGEN_ROPE_THETA:g}; "
                                  "FullVQGPT would rotate differently")
        mapping.dropped["freqs_cis"] = "rotary table, recomputed by GridRotaryEmbedding (checked equal)"
    mapping.drop(r"layers\.\d+\.attention\.kv_cache\.[kv]_cache|causal_mask", "sampling cache")
    return mapping.finish(FullVQGPT(config))


def llamagen_grid(state: dict[str, torch.Tensor]) -> tuple[int | None, str]:
    """The token grid side a LlamaGen GPT checkpoint records, and where it was read: its 2D rotary
    table ``freqs_cis`` (1 + grid^2 rows), else the length of its causal mask or KV caches (1 + grid^2,
    which LlamaGen's ``setup_caches`` rounds up to a multiple of 8); ``(None, "")`` when it records none."""
    if "freqs_cis" in state:
        positions = state["freqs_cis"].shape[0]
        side = math.isqrt(max(positions - 1, 0))
        if side * side != positions - 1:
            raise ConversionError(f"freqs_cis has {positions} rows, not 1 class token + a square grid")
        return side, "freqs_cis"
    for key, tensor in state.items():
        if key == "causal_mask" or key.endswith(".attention.kv_cache.k_cache"):
            length = tensor.shape[-1] if key == "causal_mask" else tensor.shape[-2]
            side = math.isqrt(max(length - 1, 0))
            if side and length - (1 + side * side) < 8 and (length % 8 == 0 or length == 1 + side * side):
                return side, f"{key} ({length} positions)"
    return None, ""


def _gpt_config(state: dict[str, torch.Tensor], grid_size: int | None, num_heads: int | None,
                num_classes: int | None) -> tuple[FullVQGPTConfig, list[str]]:
    """The FullVQGPT config a LlamaGen GPT's shapes (and the given overrides) imply, and notes on
    what was assumed."""
    source, notes = "llamagen-gpt", []
    vocab_size, hidden_size = shape_of(state, "tok_embeddings.weight", source)
    layers = indices_of(state, "layers.")
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"the llamagen-gpt checkpoint has layers {layers}; expected 0, 1, ...")
    if num_heads is None:
        if hidden_size not in LLAMAGEN_HEADS:
            raise ConversionError(f"hidden size {hidden_size} is none of LlamaGen's GPT widths "
                                  f"{sorted(LLAMAGEN_HEADS)}; pass --num-heads")
        num_heads = LLAMAGEN_HEADS[hidden_size]
    if hidden_size % num_heads:
        raise ConversionError(f"hidden size {hidden_size} is not divisible by num_heads={num_heads}")
    qkv_rows = shape_of(state, "layers.0.attention.wqkv.weight", source)[0]
    if qkv_rows != 3 * hidden_size:
        raise ConversionError(f"layers.0.attention.wqkv.weight has {qkv_rows} rows, not 3 x {hidden_size}: grouped "
                              "key/value heads (n_kv_head < n_head), which FullVQGPT does not have")
    side, where = llamagen_grid(state)
    if side is not None:
        if grid_size is not None and grid_size != side:
            raise ConversionError(f"grid_size={grid_size} but the checkpoint's {where} is for a {side}x{side} grid")
        grid_size = side
        notes.append(f"grid {side}x{side}, read from the checkpoint's {where}")
    elif grid_size is None:
        raise ConversionError("the llamagen-gpt checkpoint does not record its token grid (no rotary table or KV "
                              "cache); pass --grid-size 16 for 256 px or 24 for 384 px (with a 16x tokenizer), or "
                              "--resolution with --tokenizer-checkpoint")
    class_rows = shape_of(state, "cls_embedding.embedding_table.weight", source)[0]
    if num_classes is None:
        num_classes = class_rows - 1
    if class_rows not in (num_classes, num_classes + 1):
        raise ConversionError(f"cls_embedding.embedding_table.weight has {class_rows} rows for num_classes="
                              f"{num_classes}; expected {num_classes + 1} (the last is the null class)")
    config = FullVQGPTConfig(
        codebook_size=vocab_size, num_classes=num_classes, grid_size=grid_size, hidden_size=hidden_size,
        num_hidden_layers=len(layers), num_attention_heads=num_heads,
        intermediate_size=shape_of(state, "layers.0.feed_forward.w1.weight", source)[0],
        rms_norm_eps=LLAMAGEN_NORM_EPS, rope_theta=LLAMAGEN_ROPE_THETA, prefix_rotation="zero",
    )
    return config, notes


def _map_layer(mapping: KeyMapping, source: str, target: str, hidden_size: int, num_heads: int) -> None:
    """One transformer layer; the fused ``wqkv`` split, its query / key rows made rotate-half pairs."""
    qkv = mapping.take(f"{source}.attention.wqkv.weight")
    if qkv is not None:
        if qkv.shape[0] != 3 * hidden_size:
            mapping.put(f"{target}.self_attn.q_proj.weight", qkv, f"{source}.attention.wqkv.weight")
        else:
            q, k, v = qkv.split(hidden_size, dim=0)
            for name, tensor in (("q", interleaved_to_half(q, num_heads)), ("k", interleaved_to_half(k, num_heads)),
                                 ("v", v)):
                mapping.put(f"{target}.self_attn.{name}_proj.weight", tensor, f"{source}.attention.wqkv.weight")
    mapping.copy(f"{target}.self_attn.o_proj.weight", f"{source}.attention.wo.weight")
    for original, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        mapping.copy(f"{target}.mlp.{name}.weight", f"{source}.feed_forward.{original}.weight")
    mapping.copy(f"{target}.input_layernorm.weight", f"{source}.attention_norm.weight")
    mapping.copy(f"{target}.post_attention_layernorm.weight", f"{source}.ffn_norm.weight")


__all__ = ["convert_llamagen_vq", "convert_llamagen_gpt", "interleaved_to_half", "llamagen_freqs_cis", "llamagen_grid"]
