"""``fullvq cache-tokens``: encode a dataset once into token shards (``fullvq.jobs.cache_tokens``).

Each image is encoded in every view of an augmentation (``none``: the centre crop; ``flip``: the
centre crop and its mirror image; ``ten-crop``: LlamaGen's ten crops), so stage two trains on
codes without decoding a single image. Re-running the same command (with any number of
processes) finishes an interrupted cache; ``--latents`` adds the codebook a DiT / flow head needs.

    fullvq cache-tokens --tokenizer runs/tokenizer/model --data demo --output tokens/demo
    accelerate launch -m fullvq.cli cache-tokens --tokenizer ... --augmentation ten-crop ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError
from . import add_renamed, command_parser, int_at_least, run

# The views the job knows (fullvq.jobs.cache_tokens.AUGMENTATIONS; a test keeps them equal).
AUGMENTATIONS = ("none", "flip", "ten-crop")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    parser.add_argument("--tokenizer", required=True, type=Path, help="FVQModel folder (<tokenizer run>/model)")
    add_renamed(parser, "--data", "--source", required=True,
                help="image folder, save_to_disk folder, parquet file, hub dataset name, or demo")
    parser.add_argument("--output", required=True, type=Path, help="cache folder to write (or to finish)")
    parser.add_argument("--resolution", type=int_at_least(1), default=None,
                        help="image side in pixels (default: the tokenizer's sample_size)")
    parser.add_argument("--augmentation", default="flip", choices=AUGMENTATIONS,
                        help="views per image: centre crop only, + its mirror (default), or LlamaGen's ten crops")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per encoder batch, per process")
    parser.add_argument("--shard-size", type=int_at_least(1), default=10_000, help="images per shard folder")
    parser.add_argument("--num-workers", type=int_at_least(0), default=None,
                        help="DataLoader workers decoding images (default: 8 with a GPU, 0 without)")
    add_renamed(parser, "--max-images", "--limit", type=int, default=None, help="cache only the first N images")
    parser.add_argument("--latents", action="store_true",
                        help="also store the codebook, so a DiT / flow head can train on the quantized latents")
    return parser


def _cache_tokens(args: argparse.Namespace) -> int:
    from ..jobs.cache_tokens import cache_tokens

    cache_tokens(args.tokenizer, args.data, args.output, resolution=args.resolution,
                 augmentation=args.augmentation, split=args.split, image_column=args.image_column,
                 label_column=args.label_column, batch_size=args.batch_size, shard_size=args.shard_size,
                 num_workers=args.num_workers, limit=args.max_images, latents=args.latents)
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq cache-tokens") -> int:
    return run(build_parser(prog), argv, _cache_tokens, errors=(ConfigError, FileNotFoundError))
