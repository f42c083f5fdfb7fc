"""`fullvq convert`: original checkpoints (synthetic, with the originals' exact names and shapes at small
widths) convert into fullvq folders that compute what the original architectures compute.

The reference functions below re-state the originals' forward passes over their state dicts:
LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` and ``autoregressive/models/gpt.py``, and
taming's encoder/decoder with VQGAN-LC's projected codebook (``vqgan-gpt-lc/models/models_vq.py``).
"""

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F

from fullvq import FVQModel
from fullvq.cli import main
from fullvq.generator.gpt import FullVQGPT
from fullvq.jobs.convert import (
    ConversionError,
    convert_fvq,
    convert_llamagen_gpt,
    convert_llamagen_vq,
    convert_vqgan_lc,
    load_checkpoint,
)

IMAGE_SIZE = 16
CH, CH_MULT, NUM_RES_BLOCKS, Z_CHANNELS = 32, (1, 1, 2), 2, 32  # 16 px -> 4 x 4 tokens
CODEBOOK_SIZE = 64
GPT_WIDTH, GPT_HEADS, GPT_LAYERS, NUM_CLASSES = 64, 4, 2, 1000


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints: the originals' constructors, writing random tensors under their names
# ---------------------------------------------------------------------------------------------


class _Weights(dict):
    def conv(self, name, cin, cout, k):
        self[f"{name}.weight"] = torch.randn(cout, cin, k, k) / math.sqrt(cin * k * k)
        self[f"{name}.bias"] = 0.1 * torch.randn(cout)

    def norm(self, name, c):
        self[f"{name}.weight"] = 1 + 0.1 * torch.randn(c)
        self[f"{name}.bias"] = 0.1 * torch.randn(c)

    def resnet(self, name, cin, cout):
        self.norm(f"{name}.norm1", cin)
        self.conv(f"{name}.conv1", cin, cout, 3)
        self.norm(f"{name}.norm2", cout)
        self.conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(self, name, c):
        self.norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            self.conv(f"{name}.{part}", c, c, 1)


def llamagen_vq_state(codebook_dim=8, show_usage=True):
    """LlamaGen VQModel(ModelArgs(codebook_size, codebook_embed_dim, encoder/decoder_ch_mult, z_channels))."""
    w, n = _Weights(), len(CH_MULT)
    w.conv("encoder.conv_in", 3, CH, 3)
    in_ch_mult = (1,) + CH_MULT
    for i in range(n):
        block_in, block_out = CH * in_ch_mult[i], CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS):
            w.resnet(f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                w.attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != n - 1:
            w.conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    w.resnet("encoder.mid.0", block_in, block_in)
    w.attn("encoder.mid.1", block_in)
    w.resnet("encoder.mid.2", block_in, block_in)
    w.norm("encoder.norm_out", block_in)
    w.conv("encoder.conv_out", block_in, Z_CHANNELS, 3)

    block_in = CH * CH_MULT[-1]
    w.conv("decoder.conv_in", Z_CHANNELS, block_in, 3)
    w.resnet("decoder.mid.0", block_in, block_in)
    w.attn("decoder.mid.1", block_in)
    w.resnet("decoder.mid.2", block_in, block_in)
    for index, i in enumerate(reversed(range(n))):
        block_out = CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS + 1):
            w.resnet(f"decoder.conv_blocks.{index}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                w.attn(f"decoder.conv_blocks.{index}.attn.{j}", block_in)
        if i != 0:
            w.conv(f"decoder.conv_blocks.{index}.upsample.conv", block_in, block_in, 3)
    w.norm("decoder.norm_out", block_in)
    w.conv("decoder.conv_out", block_in, 3, 3)

    w.conv("quant_conv", Z_CHANNELS, codebook_dim, 1)
    w.conv("post_quant_conv", codebook_dim, Z_CHANNELS, 1)
    w["quantize.embedding.weight"] = torch.randn(CODEBOOK_SIZE, codebook_dim)
    if show_usage:
        w["quantize.codebook_used"] = torch.zeros(65536)
    return dict(w)


def vqgan_lc_state(attn_resolutions, num_codes=50, feature_dim=24, embed_dim=8):
    """VQGAN-LC VQModel: taming Encoder/Decoder(ddconfig), tok_embeddings, codebook_projection (use_cblinear=1),
    plus its discriminator and LPIPS weights."""
    w, n, resolution = _Weights(), len(CH_MULT), IMAGE_SIZE
    w.conv("encoder.conv_in", 3, CH, 3)
    curr_res, in_ch_mult = resolution, (1,) + CH_MULT
    for i in range(n):
        block_in, block_out = CH * in_ch_mult[i], CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS):
            w.resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                w.attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != n - 1:
            w.conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            curr_res //= 2
    w.resnet("encoder.mid.block_1", block_in, block_in)
    w.attn("encoder.mid.attn_1", block_in)
    w.resnet("encoder.mid.block_2", block_in, block_in)
    w.norm("encoder.norm_out", block_in)
    w.conv("encoder.conv_out", block_in, Z_CHANNELS, 3)

    block_in, curr_res = CH * CH_MULT[-1], resolution // 2 ** (n - 1)
    w.conv("decoder.conv_in", Z_CHANNELS, block_in, 3)
    w.resnet("decoder.mid.block_1", block_in, block_in)
    w.attn("decoder.mid.attn_1", block_in)
    w.resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(n)):
        block_out = CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS + 1):
            w.resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr_res in attn_resolutions:
                w.attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            w.conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            curr_res *= 2
    w.norm("decoder.norm_out", block_in)
    w.conv("decoder.conv_out", block_in, 3, 3)

    w.conv("quant_conv", Z_CHANNELS, embed_dim, 1)
    w.conv("post_quant_conv", embed_dim, Z_CHANNELS, 1)
    w["tok_embeddings.weight"] = torch.randn(num_codes, feature_dim)
    w["codebook_projection.weight"] = torch.randn(embed_dim, feature_dim) * embed_dim**-0.5
    w["codebook_projection.bias"] = 0.1 * torch.randn(embed_dim)
    w.conv("discriminator.main.0", 3, 64, 4)  # training-only parts the converter drops
    w["perceptual_loss.scaling_layer.shift"] = torch.randn(1, 3, 1, 1)
    w["perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return dict(w)


def llamagen_gpt_state(vocab_size=CODEBOOK_SIZE, dim=GPT_WIDTH, n_layer=GPT_LAYERS, num_classes=NUM_CLASSES):
    """LlamaGen Transformer(ModelArgs(dim, n_layer, n_head, vocab_size, num_classes, class_dropout_prob=0.1))."""
    hidden = int(2 * 4 * dim / 3)
    hidden = hidden + (-hidden) % 256  # find_multiple(hidden, multiple_of=256)
    std = 0.3
    w = {
        "cls_embedding.embedding_table.weight": torch.randn(num_classes + 1, dim),
        "tok_embeddings.weight": torch.randn(vocab_size, dim),
        "norm.weight": 1 + 0.1 * torch.randn(dim),
        "output.weight": torch.randn(vocab_size, dim) * std,
    }
    for i in range(n_layer):
        w[f"layers.{i}.attention.wqkv.weight"] = torch.randn(3 * dim, dim) * std
        w[f"layers.{i}.attention.wo.weight"] = torch.randn(dim, dim) * std / 2
        w[f"layers.{i}.feed_forward.w1.weight"] = torch.randn(hidden, dim) * std
        w[f"layers.{i}.feed_forward.w3.weight"] = torch.randn(hidden, dim) * std
        w[f"layers.{i}.feed_forward.w2.weight"] = torch.randn(dim, hidden) * std / 4
        w[f"layers.{i}.attention_norm.weight"] = 1 + 0.1 * torch.randn(dim)
        w[f"layers.{i}.ffn_norm.weight"] = 1 + 0.1 * torch.randn(dim)
    return w


# ---------------------------------------------------------------------------------------------
# Reference forward passes of the originals
# ---------------------------------------------------------------------------------------------


def _conv(sd, name, x, stride=1, padding=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def _norm(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def ref_resnet(sd, name, x):
    h = _conv(sd, f"{name}.conv1", F.silu(_norm(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", F.silu(_norm(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x, padding=0)
    return x + h


def ref_attn(sd, name, x):
    h = _norm(sd, f"{name}.norm", x)
    q, k, v = (_conv(sd, f"{name}.{part}", h, padding=0) for part in "qkv")
    b, c, height, width = q.shape
    weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
    weights = F.softmax(weights, dim=2)
    h = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + _conv(sd, f"{name}.proj_out", h, padding=0)


def ref_downsample(sd, name, x):
    return _conv(sd, name, F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)


def ref_upsample(sd, name, x):
    return _conv(sd, name, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _end(sd, part, h):
    return _conv(sd, f"{part}.conv_out", F.silu(_norm(sd, f"{part}.norm_out", h)))


def llamagen_encode(sd, x):
    h, n = _conv(sd, "encoder.conv_in", x), len(CH_MULT)
    for i in range(n):
        for j in range(NUM_RES_BLOCKS):
            h = ref_resnet(sd, f"encoder.conv_blocks.{i}.res.{j}", h)
            if f"encoder.conv_blocks.{i}.attn.0.q.weight" in sd:
                h = ref_attn(sd, f"encoder.conv_blocks.{i}.attn.{j}", h)
        if i != n - 1:
            h = ref_downsample(sd, f"encoder.conv_blocks.{i}.downsample.conv", h)
    h = ref_resnet(sd, "encoder.mid.2", ref_attn(sd, "encoder.mid.1", ref_resnet(sd, "encoder.mid.0", h)))
    return _conv(sd, "quant_conv", _end(sd, "encoder", h), padding=0)


def llamagen_decode(sd, z):
    h, n = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z, padding=0)), len(CH_MULT)
    h = ref_resnet(sd, "decoder.mid.2", ref_attn(sd, "decoder.mid.1", ref_resnet(sd, "decoder.mid.0", h)))
    for i in range(n):
        for j in range(NUM_RES_BLOCKS + 1):
            h = ref_resnet(sd, f"decoder.conv_blocks.{i}.res.{j}", h)
            if f"decoder.conv_blocks.{i}.attn.0.q.weight" in sd:
                h = ref_attn(sd, f"decoder.conv_blocks.{i}.attn.{j}", h)
        if i != n - 1:
            h = ref_upsample(sd, f"decoder.conv_blocks.{i}.upsample.conv", h)
    return _end(sd, "decoder", h)


def taming_encode(sd, x):
    h, n = _conv(sd, "encoder.conv_in", x), len(CH_MULT)
    for i in range(n):
        for j in range(NUM_RES_BLOCKS):
            h = ref_resnet(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.0.q.weight" in sd:
                h = ref_attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != n - 1:
            h = ref_downsample(sd, f"encoder.down.{i}.downsample.conv", h)
    h = ref_resnet(sd, "encoder.mid.block_1", h)
    h = ref_resnet(sd, "encoder.mid.block_2", ref_attn(sd, "encoder.mid.attn_1", h))
    return _conv(sd, "quant_conv", _end(sd, "encoder", h), padding=0)


def taming_decode(sd, z):
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z, padding=0))
    h = ref_resnet(sd, "decoder.mid.block_1", h)
    h = ref_resnet(sd, "decoder.mid.block_2", ref_attn(sd, "decoder.mid.attn_1", h))
    for i in reversed(range(len(CH_MULT))):
        for j in range(NUM_RES_BLOCKS + 1):
            h = ref_resnet(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.0.q.weight" in sd:
                h = ref_attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = ref_upsample(sd, f"decoder.up.{i}.upsample.conv", h)
    return _end(sd, "decoder", h)


def ref_quantize(z, codebook, l2_norm):
    """LlamaGen's / VQGAN-LC's nearest code: argmin of z^2 + e^2 - 2 z.e over the (normalised) codebook."""
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    if l2_norm:
        flat, codebook = F.normalize(flat, dim=-1), F.normalize(codebook, dim=-1)
    d = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    indices = d.argmin(dim=1)
    return indices.reshape(b, h, w), codebook[indices].reshape(b, h, w, c).permute(0, 3, 1, 2)


def ref_freqs_cis_2d(grid_size, n_elem, base=10000, cls_token_num=1):
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: half_dim // 2].float() / half_dim))
    freqs = torch.outer(torch.arange(grid_size).float(), freqs)
    grid = torch.cat([freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], -1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def ref_apply_rotary(x, freqs_cis):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def ref_rmsnorm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def llamagen_logits(sd, class_labels, tokens, n_head, grid_size):
    """LlamaGen Transformer.forward(idx, cond_idx) for c2i (one class token), all positions."""
    prefix = sd["cls_embedding.embedding_table.weight"][class_labels][:, None]
    x = torch.cat([prefix, sd["tok_embeddings.weight"][tokens]], dim=1)
    b, length, dim = x.shape
    head_dim = dim // n_head
    freqs = ref_freqs_cis_2d(grid_size, head_dim)[:length]
    layer = 0
    while f"layers.{layer}.attention.wqkv.weight" in sd:
        p = f"layers.{layer}"
        h = ref_rmsnorm(x, sd[f"{p}.attention_norm.weight"])
        q, k, v = (h @ sd[f"{p}.attention.wqkv.weight"].t()).split(dim, dim=-1)
        q, k, v = (t.view(b, length, n_head, head_dim) for t in (q, k, v))
        q, k = ref_apply_rotary(q, freqs), ref_apply_rotary(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + out.transpose(1, 2).reshape(b, length, dim) @ sd[f"{p}.attention.wo.weight"].t()
        h = ref_rmsnorm(x, sd[f"{p}.ffn_norm.weight"])
        ffn = F.silu(h @ sd[f"{p}.feed_forward.w1.weight"].t()) * (h @ sd[f"{p}.feed_forward.w3.weight"].t())
        x = x + ffn @ sd[f"{p}.feed_forward.w2.weight"].t()
        layer += 1
    return ref_rmsnorm(x, sd["norm.weight"]) @ sd["output.weight"].t()


def images(batch=2):
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1


def assert_consumed_once(conversion, state):
    assert set(conversion.uses) == set(state)
    assert set(conversion.uses.values()) == {1}


def save(path, obj):
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_llamagen_vq_gives_the_original_indices_and_images(tmp_path):
    state = llamagen_vq_state()
    conversion = convert_llamagen_vq(state, image_size=IMAGE_SIZE)
    assert_consumed_once(conversion, state)
    assert conversion.dropped == {"quantize.codebook_used": "usage counter of training"}
    model = conversion.model
    assert model.config.quantizer == "vq" and model.quantize.l2_norm
    assert model.latent_grid() == (4, 4)

    x = images()
    with torch.no_grad():
        z = llamagen_encode(state, x)
        ref_indices, ref_codes = ref_quantize(z, state["quantize.embedding.weight"], l2_norm=True)
        ref_images = llamagen_decode(state, ref_codes)
        torch.testing.assert_close(model.encode(x), z, atol=1e-4, rtol=1e-4)
        indices = model.encode_indices(x)
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(model(x).sample, ref_images, atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "tok")
    reloaded = FVQModel.from_pretrained(tmp_path / "tok")
    assert torch.equal(reloaded.encode_indices(x), ref_indices)
    torch.testing.assert_close(reloaded.decode_indices(ref_indices), ref_images.clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_fvq_in_vqgan_format_searches_its_unnormalised_codebook_by_plain_l2():
    state = llamagen_vq_state(codebook_dim=16, show_usage=False)
    state["quantize.embedding.weight"] *= 0.05  # a C_hat at the scale of the latents
    conversion = convert_fvq(state, image_size=IMAGE_SIZE)
    assert_consumed_once(conversion, state)
    model = conversion.model
    assert not model.quantize.l2_norm and model.config.codebook_dim == 16
    x = images()
    with torch.no_grad():
        ref_indices, ref_codes = ref_quantize(llamagen_encode(state, x), state["quantize.embedding.weight"], False)
        assert torch.equal(model.encode_indices(x), ref_indices)
        torch.testing.assert_close(model(x).sample, llamagen_decode(state, ref_codes), atol=1e-4, rtol=1e-4)


BRIDGE_WIDTH, BRIDGE_PATCH, BRIDGE_HEADS, BRIDGE_CLASSES = 32, 2, 4, 10  # 64 codes: 8 x 8 image, 16 tokens


def mae_sincos(width, side):
    """MAE's get_2d_sincos_pos_embed, re-stated: meshgrid(w, h); the first half encodes grid[0] (w)."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    grid_w, grid_h = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    return torch.cat([one_d(width // 2, grid_w), one_d(width // 2, grid_h)], dim=1).float()


def add_bridge(state, prefix="quantize.qbridge", dit_style=False, depth=2):
    """FVQ's VQBridge (qbridge_ViT.py; qbridge.py when dit_style) under its official names, random weights."""
    d, h, p = state["quantize.embedding.weight"].shape[1], BRIDGE_WIDTH, BRIDGE_PATCH
    state[f"{prefix}.x_embedder.proj.weight"] = torch.randn(h, d, p, p) / math.sqrt(d * p * p)
    state[f"{prefix}.x_embedder.proj.bias"] = 0.1 * torch.randn(h)

    def linear(name, fan_in, fan_out):
        state[f"{name}.weight"] = torch.randn(fan_out, fan_in) / math.sqrt(fan_in)
        state[f"{name}.bias"] = 0.1 * torch.randn(fan_out)

    for i in range(depth):
        linear(f"{prefix}.blocks.{i}.attn.qkv", h, 3 * h)
        linear(f"{prefix}.blocks.{i}.attn.proj", h, h)
        linear(f"{prefix}.blocks.{i}.mlp.fc1", h, 2 * h)
        linear(f"{prefix}.blocks.{i}.mlp.fc2", 2 * h, h)
        if dit_style:
            linear(f"{prefix}.blocks.{i}.adaLN_modulation.1", h, 6 * h)
    linear(f"{prefix}.final_layer.linear", h, p * p * d)
    if dit_style:
        linear(f"{prefix}.final_layer.adaLN_modulation.1", h, 2 * h)
        side = math.isqrt(state["quantize.embedding.weight"].shape[0]) // p
        state[f"{prefix}.pos_embed"] = mae_sincos(h, side)[None]
        state[f"{prefix}.y_embedder.embedding_table.weight"] = torch.randn(BRIDGE_CLASSES + 1, h)


def ref_bridge(sd, prefix="quantize.qbridge", label=None):
    """The official VQBridge's forward: codebook -> (1, D, s, s) image (code k at row k // s), P x P patch
    embedding, pre-LN ViT (or adaLN-Zero DiT) blocks, final layer, unpatchify ('nhwpqc->nchpwq')."""
    codebook = sd["quantize.embedding.weight"]
    k, d = codebook.shape
    s, p, h = math.isqrt(k), BRIDGE_PATCH, BRIDGE_WIDTH
    image = codebook.t().reshape(1, d, s, s)
    x = F.conv2d(image, sd[f"{prefix}.x_embedder.proj.weight"], sd[f"{prefix}.x_embedder.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)  # (1, T, h), tokens row-major
    dit = f"{prefix}.pos_embed" in sd
    if dit:
        x = x + sd[f"{prefix}.pos_embed"]
        table = sd[f"{prefix}.y_embedder.embedding_table.weight"]
        c = F.silu(table[len(table) - 1 if label is None else label])[None]

    def lin(name, t):
        return F.linear(t, sd[f"{prefix}.{name}.weight"], sd[f"{prefix}.{name}.bias"])

    def ln(t):
        return F.layer_norm(t, (h,), eps=1e-6)

    def attention(i, t):
        qkv = lin(f"blocks.{i}.attn.qkv", t).reshape(1, -1, 3, BRIDGE_HEADS, h // BRIDGE_HEADS)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)
        a = (q @ kk.transpose(-2, -1) * (h // BRIDGE_HEADS) ** -0.5).softmax(-1) @ v
        return lin(f"blocks.{i}.attn.proj", a.transpose(1, 2).reshape(1, -1, h))

    def mlp(i, t):
        return lin(f"blocks.{i}.mlp.fc2", F.gelu(lin(f"blocks.{i}.mlp.fc1", t), approximate="tanh"))

    for i in range(len({key.split(".")[3] for key in sd if key.startswith(f"{prefix}.blocks.")})):
        if dit:
            sm, cm, gm, sf, cf, gf = lin(f"blocks.{i}.adaLN_modulation.1", c).chunk(6, dim=1)
            x = x + gm[:, None] * attention(i, ln(x) * (1 + cm[:, None]) + sm[:, None])
            x = x + gf[:, None] * mlp(i, ln(x) * (1 + cf[:, None]) + sf[:, None])
        else:
            x = x + attention(i, ln(x))
            x = x + mlp(i, ln(x))
    x = ln(x)
    if dit:
        shift, scale = lin("final_layer.adaLN_modulation.1", c).chunk(2, dim=1)
        x = x * (1 + scale[:, None]) + shift[:, None]
    x = lin("final_layer.linear", x)  # (1, T, p * p * d)
    g = s // p
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(1, g, g, p, p, d)).reshape(1, d, s, s)
    return x.reshape(d, k).t()


@pytest.mark.parametrize("dit_style, prefix", [(False, "quantize.qbridge"), (False, "quantize.embedding_monitor"),
                                               (True, "quantize.qbridge")], ids=["vit", "older-prefix", "dit-style"])
def test_fvq_checkpoint_with_its_vqbridge_gives_the_original_codebook_indices_and_images(dit_style, prefix, tmp_path):
    state = llamagen_vq_state(codebook_dim=16)
    add_bridge(state, prefix, dit_style)
    conversion = convert_fvq(state, image_size=IMAGE_SIZE)
    assert_consumed_once(conversion, state)
    model = conversion.model
    assert model.config.quantizer == "fvq" and model.quantize.layout == "square" and model.quantize.group_size == 4
    with torch.no_grad():
        codebook = ref_bridge(state, prefix)
        torch.testing.assert_close(model.quantize.codebook(), codebook, atol=1e-5, rtol=1e-5)
        x = images()
        ref_indices, ref_codes = ref_quantize(llamagen_encode(state, x), codebook, False)
        assert torch.equal(model.encode_indices(x), ref_indices)
        torch.testing.assert_close(model(x).sample, llamagen_decode(state, ref_codes), atol=1e-4, rtol=1e-4)
    path = save(tmp_path / "fvq.pt", {"model": state, "steps": 10})
    assert main(["convert", "--from", "fvq", path, "--out", str(tmp_path / "tok")]) == 0
    reloaded = FVQModel.from_pretrained(tmp_path / "tok")
    with torch.no_grad():
        assert torch.equal(reloaded.encode_indices(x), ref_indices)


def test_dit_style_bridge_is_conditioned_on_the_chosen_class_row(tmp_path):
    state = llamagen_vq_state(codebook_dim=16)
    add_bridge(state, dit_style=True)
    with torch.no_grad():
        default = convert_fvq(state, image_size=IMAGE_SIZE).model.quantize.codebook()
        third = convert_fvq(state, image_size=IMAGE_SIZE, bridge_class=3).model.quantize.codebook()
        torch.testing.assert_close(third, ref_bridge(state, label=3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(default, third, atol=1e-3)
    # A DiT-style bridge built in fullvq (not converted) gets the same fixed positions as the original.
    from fullvq.tokenizer.quantizers.bridge import sincos_position_embedding

    torch.testing.assert_close(sincos_position_embedding(BRIDGE_WIDTH, 4), mae_sincos(BRIDGE_WIDTH, 4))
    with pytest.raises(ConversionError, match="bridge_class=11 is outside"):
        convert_fvq(state, image_size=IMAGE_SIZE, bridge_class=11)


def test_fvq_bridge_with_a_missing_or_foreign_key_is_refused_with_the_keys():
    state = llamagen_vq_state(codebook_dim=16)
    add_bridge(state)
    del state["quantize.qbridge.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys .*blocks\.1\.mlp\.fc2\.bias"):
        convert_fvq(state, image_size=IMAGE_SIZE)
    state = llamagen_vq_state(codebook_dim=16)
    state["quantize.other.weight"] = torch.randn(4)
    with pytest.raises(ConversionError, match=r"quantize\.other\.weight"):
        convert_fvq(state, image_size=IMAGE_SIZE)
    state = llamagen_vq_state(codebook_dim=16)
    add_bridge(state)
    with pytest.raises(ConversionError, match="--from fvq"):
        convert_llamagen_vq(state, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("attn_resolutions", [(4,), (2,)], ids=["f16-like-level-attention", "f8-like-mid-only"])
def test_vqgan_lc_gives_the_original_indices_and_images(attn_resolutions, tmp_path):
    state = vqgan_lc_state(attn_resolutions)
    conversion = convert_vqgan_lc(state, image_size=IMAGE_SIZE)
    assert_consumed_once(conversion, state)
    assert {key.split(".")[0] for key in conversion.dropped} == {"discriminator", "perceptual_loss"}
    model = conversion.model
    assert model.config.quantizer == "lc" and model.quantize.feature_dim == 24
    assert model.config.attention_levels == (None if attn_resolutions == (4,) else ())

    projection = state["codebook_projection.weight"], state["codebook_projection.bias"]
    codebook = state["tok_embeddings.weight"] @ projection[0].t() + projection[1]
    x = images()
    with torch.no_grad():
        ref_indices, ref_codes = ref_quantize(taming_encode(state, x), codebook, l2_norm=False)
        assert torch.equal(model.encode_indices(x), ref_indices)
        torch.testing.assert_close(model(x).sample, taming_decode(state, ref_codes), atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path / "lc")
    assert torch.equal(FVQModel.from_pretrained(tmp_path / "lc").encode_indices(x), ref_indices)


def test_vqgan_lc_without_its_codebook_takes_the_codebook_file(tmp_path, capsys):
    state = vqgan_lc_state((4,))
    table = state.pop("tok_embeddings.weight")
    checkpoint = save(tmp_path / "lc.pth", {"model": state})
    assert main(["convert", "--from", "vqgan-lc", checkpoint, "--out", str(tmp_path / "a"),
                 "--image-size", str(IMAGE_SIZE)]) == 2
    assert "--codebook" in capsys.readouterr().err and not (tmp_path / "a").exists()
    codebook = save(tmp_path / "codebook-100K.pth", table)
    assert main(["convert", "--from", "vqgan-lc", checkpoint, "--codebook", codebook, "--out", str(tmp_path / "a"),
                 "--image-size", str(IMAGE_SIZE)]) == 0
    model = FVQModel.from_pretrained(tmp_path / "a")
    assert torch.equal(model.quantize.frozen_codebook, table)


# ---------------------------------------------------------------------------------------------
# GPT and pipeline
# ---------------------------------------------------------------------------------------------


def test_llamagen_gpt_gives_the_original_logits(tmp_path):
    state = llamagen_gpt_state()
    conversion = convert_llamagen_gpt(state, grid_size=4, num_heads=GPT_HEADS)
    assert_consumed_once(conversion, state)
    gpt = conversion.model
    assert gpt.config.num_classes == NUM_CLASSES and gpt.config.prefix_rotation == "zero"

    labels, tokens = torch.tensor([3, NUM_CLASSES]), torch.randint(0, CODEBOOK_SIZE, (2, 16))
    with torch.no_grad():
        expected = llamagen_logits(state, labels, tokens, GPT_HEADS, grid_size=4)
        torch.testing.assert_close(gpt(input_ids=tokens, class_labels=labels).logits, expected, atol=1e-4, rtol=1e-4)

    gpt.save_pretrained(tmp_path / "gpt")
    reloaded = FullVQGPT.from_pretrained(tmp_path / "gpt").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=tokens, class_labels=labels).logits
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_gpt_without_the_row_permutation_would_differ():
    state = llamagen_gpt_state(n_layer=1)
    gpt = convert_llamagen_gpt(state, grid_size=4, num_heads=GPT_HEADS).model
    labels, tokens = torch.tensor([1]), torch.randint(0, CODEBOOK_SIZE, (1, 16))
    with torch.no_grad():
        q, k, _ = state["layers.0.attention.wqkv.weight"].split(GPT_WIDTH)
        gpt.model.layers[0].self_attn.q_proj.weight.copy_(q)
        gpt.model.layers[0].self_attn.k_proj.weight.copy_(k)
        wrong = gpt(input_ids=tokens, class_labels=labels).logits
    assert not torch.allclose(wrong, llamagen_logits(state, labels, tokens, GPT_HEADS, 4), atol=1e-3)


def test_gpt_reads_its_grid_from_freqs_cis_and_drops_runtime_buffers():
    state = llamagen_gpt_state(n_layer=1, num_classes=10)
    state["freqs_cis"] = ref_freqs_cis_2d(4, GPT_WIDTH // GPT_HEADS)
    state["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, GPT_HEADS, 24, 16)
    state["layers.0.attention.kv_cache.v_cache"] = torch.zeros(2, GPT_HEADS, 24, 16)
    conversion = convert_llamagen_gpt(state, num_heads=GPT_HEADS)
    assert_consumed_once(conversion, state)
    assert conversion.model.config.grid_size == [4, 4] and conversion.model.config.num_classes == 10
    state["freqs_cis"] = ref_freqs_cis_2d(4, GPT_WIDTH // GPT_HEADS, base=500)
    with pytest.raises(ConversionError, match="freqs_cis"):
        convert_llamagen_gpt(state, num_heads=GPT_HEADS)


def test_gpt_trained_without_class_dropout_gets_a_zero_null_class_row():
    state = llamagen_gpt_state(n_layer=1, num_classes=10)
    state["cls_embedding.embedding_table.weight"] = state["cls_embedding.embedding_table.weight"][:10]
    conversion = convert_llamagen_gpt(state, grid_size=4, num_heads=GPT_HEADS, num_classes=10)
    table = conversion.model.class_embedding.weight
    assert table.shape == (11, GPT_WIDTH) and not table[10].any()
    assert torch.equal(table[:10], state["cls_embedding.embedding_table.weight"])
    assert any("guidance_scale=1" in note for note in conversion.notes)
    with pytest.raises(ConversionError, match="rows for num_classes=12"):
        convert_llamagen_gpt(state, grid_size=4, num_heads=GPT_HEADS, num_classes=12)


def test_gpt_and_tokenizer_convert_into_one_pipeline_with_imagenet_labels(tmp_path, capsys):
    from fullvq.pipelines.autoregressive import FullVQPipeline

    vq_state, gpt_state = llamagen_vq_state(), llamagen_gpt_state()
    vq = save(tmp_path / "vq_ds16_c2i.pt", {"model": vq_state, "steps": 10, "args": argparse.Namespace(lr=1e-4)})
    gpt = save(tmp_path / "c2i_B_256.pt", {"model": gpt_state})
    out = tmp_path / "pipeline"
    assert main(["convert", "--from", "llamagen-gpt", gpt, "--tokenizer-checkpoint", vq, "--out", str(out),
                 "--image-size", str(IMAGE_SIZE), "--num-heads", str(GPT_HEADS)]) == 0
    log = capsys.readouterr().out
    assert "under 'model'" in log and "FullVQPipeline" in log

    pipe = FullVQPipeline.from_pretrained(out)
    assert pipe.config.id2label[207] == "golden retriever"
    labels, tokens = torch.tensor([207, 1]), torch.randint(0, CODEBOOK_SIZE, (2, 16))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(pipe.gpt(input_ids=tokens, class_labels=labels).logits,
                                   llamagen_logits(gpt_state, labels, tokens, GPT_HEADS, 4), atol=1e-4, rtol=1e-4)
        ref_indices, _ = ref_quantize(llamagen_encode(vq_state, x), vq_state["quantize.embedding.weight"], True)
        assert torch.equal(pipe.tokenizer.encode_indices(x), ref_indices)
    result = pipe(class_labels=["golden retriever"], guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                  output_type="pt")
    assert result.images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


# ---------------------------------------------------------------------------------------------
# Reading checkpoints, refusing bad ones, writing atomically
# ---------------------------------------------------------------------------------------------


def test_state_dict_is_found_under_model_ema_or_the_root_and_wrappers_are_stripped(tmp_path):
    """Issue 19, class 18: "model" by default, as LlamaGen's own sampling scripts read it; --weights ema
    picks the EMA weights; the reason is always given."""
    a, b = llamagen_vq_state(), llamagen_vq_state()
    path = save(tmp_path / "both.pt", {"model": a, "ema": b, "args": argparse.Namespace(ema=True)})
    state, where, why = load_checkpoint(path)
    assert where == "model" and torch.equal(state["quant_conv.weight"], a["quant_conv.weight"])
    assert "'ema'" in why and "--weights ema" in why
    state, where, why = load_checkpoint(path, weights="ema")
    assert where == "ema" and torch.equal(state["quant_conv.weight"], b["quant_conv.weight"]) and "--weights" in why
    state, where, why = load_checkpoint(save(tmp_path / "ddp.pt", {f"module.{k}": v for k, v in a.items()}))
    assert where == "root" and set(state) == set(a) and why


class Opaque:  # an object weights_only loading refuses to build
    pass


def _corrupt(kind, tmp_path):
    state = llamagen_vq_state()
    if kind == "missing":
        del state["decoder.conv_out.bias"]
        return save(tmp_path / "c.pt", {"model": state}), "decoder.conv_out.bias"
    if kind == "unknown":
        state["encoder.conv_blocks.0.extra.weight"] = torch.zeros(3)
        return save(tmp_path / "c.pt", {"model": state}), "encoder.conv_blocks.0.extra.weight"
    if kind == "shape":
        state["encoder.conv_blocks.0.res.0.conv2.weight"] = torch.zeros(CH, CH, 1, 1)
        return save(tmp_path / "c.pt", {"model": state}), r"encoder.conv_blocks.0.res.0.conv2.weight \(32, 32, 1, 1\)"
    if kind == "other-kind":
        return save(tmp_path / "c.pt", {"model": llamagen_gpt_state(n_layer=1)}), "use --from llamagen-gpt"
    if kind == "truncated":
        path = save(tmp_path / "full.pt", {"model": state})
        data = open(path, "rb").read()
        (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "c.pt"), "cannot be read"
    if kind == "code":
        return save(tmp_path / "c.pt", {"model": state, "extra": Opaque()}), "weights_only=True"
    if kind == "text":  # issue 19, class 15
        (tmp_path / "c.pt").write_text("epoch,loss\n1,0.5\n")
        return str(tmp_path / "c.pt"), "is not a PyTorch checkpoint"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unknown", "shape", "other-kind", "truncated", "code", "text"])
def test_corrupted_checkpoint_is_refused_naming_the_problem_and_nothing_is_written(kind, tmp_path, capsys):
    checkpoint, message = _corrupt(kind, tmp_path)
    out = tmp_path / "out" / "tokenizer"
    assert main(["convert", "--from", "llamagen-vq", checkpoint, "--out", str(out),
                 "--image-size", str(IMAGE_SIZE)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_no_folder_and_an_existing_one_needs_overwrite(tmp_path, monkeypatch, capsys):
    checkpoint = save(tmp_path / "vq.pt", {"model": llamagen_vq_state()})
    out = tmp_path / "tok"
    args = ["convert", "--from", "llamagen-vq", checkpoint, "--out", str(out), "--image-size", str(IMAGE_SIZE)]

    def failing_save(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(FVQModel, "save_pretrained", failing_save)
        with pytest.raises(OSError, match="disk full"):
            main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq.pt"]

    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--no-l2-norm"]) == 0
    assert not FVQModel.from_pretrained(out).quantize.l2_norm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok", "vq.pt"]


def test_a_converted_folder_carries_a_card_naming_its_source(tmp_path):
    import yaml

    gpt = save(tmp_path / "c2i_B_256.pt", {"model": llamagen_gpt_state(n_layer=1)})
    assert main(["convert", "--from", "llamagen-gpt", gpt, "--out", str(tmp_path / "gpt"),
                 "--num-heads", str(GPT_HEADS), "--grid-size", "4"]) == 0
    card = (tmp_path / "gpt" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "other" and meta["fullvq"]["source"] == "llamagen-gpt checkpoint c2i_B_256.pt"
    assert "converted from llamagen-gpt checkpoint c2i_B_256.pt" in card


# ---------------------------------------------------------------------------------------------
# Issue 19, class 18: infer what the checkpoint shows, refuse to guess, name unsupported variants
# ---------------------------------------------------------------------------------------------


def test_gpt_grid_comes_from_its_caches_or_is_asked_for_never_guessed(tmp_path, capsys):
    state = llamagen_gpt_state(n_layer=1)
    with pytest.raises(ConversionError, match="--grid-size"):
        convert_llamagen_gpt(state, num_heads=GPT_HEADS)
    # LlamaGen's KV caches hold 1 + grid^2 positions, rounded up to a multiple of 8 (1 + 6^2 = 37 -> 40).
    state["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, GPT_HEADS, 40, GPT_WIDTH // GPT_HEADS)
    state["layers.0.attention.kv_cache.v_cache"] = torch.zeros(2, GPT_HEADS, 40, GPT_WIDTH // GPT_HEADS)
    conversion = convert_llamagen_gpt(state, num_heads=GPT_HEADS)
    assert conversion.model.config.grid_size == [6, 6] and any("k_cache" in note for note in conversion.notes)
    with pytest.raises(ConversionError, match="grid_size=4 but"):
        convert_llamagen_gpt(state, grid_size=4, num_heads=GPT_HEADS)

    gpt = save(tmp_path / "gpt.pt", {"model": llamagen_gpt_state(n_layer=1)})
    assert main(["convert", "--from", "llamagen-gpt", gpt, "--num-heads", str(GPT_HEADS),
                 "--output", str(tmp_path / "g")]) == 2
    assert "--grid-size" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_a_paired_tokenizer_without_an_image_size_takes_the_gpts_grid_or_is_refused(tmp_path, capsys):
    vq = save(tmp_path / "vq.pt", {"model": llamagen_vq_state()})
    gpt_state = llamagen_gpt_state(n_layer=1)
    gpt = save(tmp_path / "gpt.pt", {"model": gpt_state})
    args = ["convert", "--from", "llamagen-gpt", gpt, "--tokenizer-checkpoint", vq, "--num-heads", str(GPT_HEADS)]
    assert main(args + ["--output", str(tmp_path / "a")]) == 2
    assert "--resolution" in capsys.readouterr().err and not (tmp_path / "a").exists()

    gpt_state["freqs_cis"] = ref_freqs_cis_2d(6, GPT_WIDTH // GPT_HEADS)  # the GPT records a 6 x 6 grid
    gpt = save(tmp_path / "gpt.pt", {"model": gpt_state})
    assert main(args + ["--output", str(tmp_path / "b")]) == 0
    assert "sample_size=24" in capsys.readouterr().out  # 6 tokens x the tokenizer's 4x downsampling
    from fullvq.pipelines.autoregressive import FullVQPipeline

    pipe = FullVQPipeline.from_pretrained(tmp_path / "b")
    assert pipe.gpt.config.grid_size == [6, 6] and pipe.tokenizer.config.sample_size == 24


def test_fvq_ablation_bridges_are_named_unsupported():
    state = llamagen_vq_state()
    state["quantize.qbridge.linear.weight"] = torch.randn(8, 8)  # a linear bridge (FVQ's Qbridge-lin ablations)
    state["quantize.qbridge.linear.bias"] = torch.randn(8)
    with pytest.raises(ConversionError, match="unsupported FVQ variant.*Qbridge-lin"):
        convert_fvq(state)
