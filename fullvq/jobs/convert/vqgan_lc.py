"""VQGAN-LC's ``VQModel`` (``vqgan-gpt-lc/models/models_vq.py``): taming's encoder/decoder
(``encoder.down.{level}.block|attn``, ``decoder.up.{level}``, ``mid.block_1``, ``attn_1``,
``block_2``), the frozen feature codebook ``tok_embeddings.weight`` (N x 768) and the linear
projector ``codebook_projection`` (768 -> embed_dim) -> fullvq's ``lc`` quantizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ...tokenizer.modeling import FVQModel
from ...tokenizer.quantizers.projected import read_codebook_file
from .autoencoder import TAMING_LAYOUT, autoencoder_config, map_autoencoder
from .common import Conversion, ConversionError, KeyMapping, check_family, shape_of


def convert_vqgan_lc(state: dict[str, torch.Tensor], *, image_size: int = 256,
                     codebook: torch.Tensor | str | Path | None = None) -> Conversion:
    """VQGAN-LC's ``VQModel`` state dict -> :class:`FVQModel` with the ``lc`` quantizer.

    Args:
        codebook: the frozen N x feature_dim codebook (tensor or file: VQGAN-LC's ``codebook-100K.pth``
            or ``fullvq init-codebook`` output), needed only when the checkpoint lacks
            ``tok_embeddings.weight``.
    """
    source = "vqgan-lc"
    check_family(state, source)
    mapping = KeyMapping(state, source)
    if "tok_embeddings.weight" in state:
        table = mapping.take("tok_embeddings.weight")
        if codebook is not None:
            mapping.notes.append("the checkpoint holds tok_embeddings.weight; the --codebook file was not used")
    elif codebook is not None:
        table = codebook if isinstance(codebook, torch.Tensor) else read_codebook_file(Path(codebook))
    else:
        raise ConversionError("the vqgan-lc checkpoint lacks tok_embeddings.weight (its frozen codebook); pass the "
                              "codebook file it was trained with (e.g. codebook-100K.pth) with --codebook")
    if table.ndim != 2:
        raise ConversionError(f"the vqgan-lc codebook has shape {tuple(table.shape)}; expected (N, feature_dim)")
    codebook_dim = shape_of(state, "quant_conv.weight", source)[0]
    if any(key.startswith("codebook_projection.0.") for key in state):
        raise ConversionError("this vqgan-lc checkpoint uses the MLP codebook projector (use_cblinear=2: "
                              "codebook_projection.0/.2); fullvq's lc quantizer has the linear one (use_cblinear=1)")
    if codebook_dim == 768:
        raise ConversionError("vqgan-lc with embed_dim=768 l2-normalises the encoder output but not the codebook, "
                              "which fullvq's quantizers do not do; only embed_dim != 768 converts exactly")
    config = autoencoder_config(state, TAMING_LAYOUT, source)
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
    map_autoencoder(mapping, TAMING_LAYOUT, config)
    mapping.drop(r"(discriminator|perceptual_loss)\..*", "training loss (discriminator / LPIPS)")
    mapping.drop(r"cluster_size|embed_avg", "EMA quantizer state of training")
    mapping.notes.append(f"sample_size={image_size}")
    return mapping.finish(model)



__all__ = ["convert_vqgan_lc"]
