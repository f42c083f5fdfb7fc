"""Released LlamaGen / FVQ / VQGAN-LC checkpoints -> fullvq ``save_pretrained`` folders.

``fullvq convert --from llamagen-vq|llamagen-gpt|fvq|vqgan-lc CHECKPOINT --output DIR``

Every tensor of the original state dict is either mapped, by name and checked by shape, onto a
fullvq weight or dropped by name because inference does not use it (discriminator, LPIPS, usage
counters, KV caches); anything else is an error that lists the keys. The converted model computes
what the original architecture computes with the same weights. One module per source format:

- ``common``: the key-mapping engine, reading checkpoints (``weights_only=True``), family detection;
- ``autoencoder``: the taming-style encoder / decoder every tokenizer format shares;
- ``llamagen``: LlamaGen's VQ tokenizer and class-to-image GPT;
- ``fvq``: FVQ's tokenizers (VQGAN format, or with the VQBridge);
- ``vqgan_lc``: VQGAN-LC's tokenizer;
- ``folders``: the job itself, ``convert_checkpoint``.
"""

from .common import (
    BRIDGE_PREFIXES,
    SOURCES,
    TOKENIZER_SOURCES,
    Conversion,
    ConversionError,
    detect_source,
    load_checkpoint,
)
from .folders import CONVERTERS, convert_checkpoint, imagenet_id2label
from .fvq import convert_fvq
from .llamagen import convert_llamagen_gpt, convert_llamagen_vq, interleaved_to_half, llamagen_freqs_cis
from .vqgan_lc import convert_vqgan_lc

__all__ = [
    "SOURCES",
    "TOKENIZER_SOURCES",
    "BRIDGE_PREFIXES",
    "CONVERTERS",
    "ConversionError",
    "Conversion",
    "load_checkpoint",
    "detect_source",
    "convert_llamagen_vq",
    "convert_fvq",
    "convert_vqgan_lc",
    "convert_llamagen_gpt",
    "convert_checkpoint",
    "interleaved_to_half",
    "llamagen_freqs_cis",
    "imagenet_id2label",
]
