"""``fullvq convert --from KIND CHECKPOINT --output DIR``: an original LlamaGen / FVQ / VQGAN-LC checkpoint
(.pt, read with weights_only=True) as a fullvq save_pretrained folder (``fullvq.jobs.convert``).

Example: ``--from llamagen-gpt c2i_L_256.pt --tokenizer-checkpoint vq_ds16_c2i.pt --output llamagen-L``
writes one FullVQPipeline folder.
"""

from __future__ import annotations

import argparse

from . import add_renamed, command_parser, run

# The formats the job converts (fullvq.jobs.convert.SOURCES / TOKENIZER_SOURCES; a test keeps them equal).
SOURCES = ("llamagen-vq", "llamagen-gpt", "fvq", "vqgan-lc")
TOKENIZER_SOURCES = ("llamagen-vq", "fvq", "vqgan-lc")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                        help="checkpoint kind: llamagen-vq (LlamaGen VQ-8/16), fvq (FVQ tokenizer: VQGAN format or "
                             "with its VQBridge), "
                             "vqgan-lc (VQGAN-LC tokenizer), llamagen-gpt (LlamaGen class-to-image GPT)")
    parser.add_argument("checkpoint", help="the original .pt / .pth checkpoint")
    add_renamed(parser, "--output", "--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--weights", default="auto",
                        help="state dict to read: auto (model, ema, module, state_dict, else the file's dict; "
                             "model first, as LlamaGen's sampling scripts), one of those keys, or root")
    add_renamed(parser, "--resolution", "--image-size", type=int, default=None,
                help="the tokenizer's image side (sample_size) in pixels (a tokenizer alone: default 256; a GPT "
                     "with --tokenizer-checkpoint: taken from the GPT's grid when it records one)")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--l2-norm", dest="l2_norm", action="store_true", default=None,
                      help="codebook search on the unit sphere (default for llamagen-vq)")
    norm.add_argument("--no-l2-norm", dest="l2_norm", action="store_false",
                      help="plain L2 codebook search (default for fvq)")
    parser.add_argument("--codebook", help="vqgan-lc: its frozen codebook file, when the checkpoint lacks "
                                           "tok_embeddings.weight")
    parser.add_argument("--grid-size", type=int,
                        help="llamagen-gpt: token grid side (16 for 256 px, 24 for 384 px); needed only when "
                             "neither the checkpoint nor the paired tokenizer's --resolution tells it")
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return parser


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..jobs.convert import convert_checkpoint

    convert_checkpoint(
        args.source, args.checkpoint, args.output, weights=args.weights, image_size=args.resolution,
        l2_norm=args.l2_norm, codebook=args.codebook, grid_size=args.grid_size, num_heads=args.num_heads,
        num_classes=args.num_classes, tokenizer_checkpoint=args.tokenizer_checkpoint,
        tokenizer_source=args.tokenizer_from, tokenizer_weights=args.tokenizer_weights,
        dtype=getattr(torch, args.dtype), overwrite=args.overwrite, bridge_heads=args.bridge_heads,
        bridge_class=args.bridge_class,
    )
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq convert") -> int:
    # ConversionError is a ValueError.
    return run(build_parser(prog), argv, _convert, errors=(ValueError, FileNotFoundError, FileExistsError))
