"""``fullvq sample PIPELINE_DIR --labels ... --output DIR``: generate images from a pipeline folder.

Either pipeline: a ``FullVQPipeline`` (GPT: ``--temperature``, ``--top-k``, ``--top-p``,
``--guidance-schedule``) or a ``LatentFlowPipeline`` (DiT / flow: ``--num-inference-steps``,
``--snap-to-codebook``); settings of the other kind are refused.

Writes one PNG per image, named ``{class id}_{i}.png``, and ``grid.png`` (one row per label).

Labels are class ids or class names, one per argument: ``--labels 207 360`` or ``--labels 207,360``
(a comma-separated list of ids), ``--labels "golden retriever" tench`` (a name, or any of its
comma-separated ImageNet synonyms, is one argument; quote names with spaces).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_renamed, command_parser, run

# The sampling settings, passed on only when given (None: the pipeline's own default).
_OPTIONS = ("guidance_scale", "guidance_schedule", "temperature", "top_k", "top_p", "num_inference_steps",
            "snap_to_codebook")


def parse_labels(arguments: list[str]) -> list[int | str]:
    """``["207,360", "golden retriever"]`` -> ``[207, 360, "golden retriever"]``: an argument made only
    of comma-separated integers is a list of ids; any other argument is one class name."""
    labels: list[int | str] = []
    for argument in arguments:
        pieces = [piece.strip() for piece in argument.split(",") if piece.strip()]
        if pieces and all(piece.lstrip("-").isdigit() for piece in pieces):
            labels += [int(piece) for piece in pieces]
        elif argument.strip():
            labels.append(argument.strip())
    return labels


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    parser.add_argument("pipeline", metavar="PIPELINE_DIR", help="pipeline folder (model_index.json) or hub id")
    parser.add_argument("--labels", nargs="+", required=True, help="class ids or names (see above)")
    add_renamed(parser, "--images-per-class", "--num-per-label", type=int, default=1,
                help="images per label (default 1)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance; 1 = off (default: the pipeline's, 2.0 GPT, 4.0 DiT / flow)")
    parser.add_argument("--guidance-schedule", choices=("constant", "linear"), default=None,
                        help="GPT (default constant)")
    parser.add_argument("--temperature", type=float, default=None, help="GPT: 0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="GPT: 0 = off (default)")
    parser.add_argument("--top-p", type=float, default=None, help="GPT: 1 = off (default)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="DiT / flow: scheduler steps (50)")
    parser.add_argument("--snap-to-codebook", action="store_const", const=True, default=None,
                        help="DiT / flow: decode the nearest codes of the generated latents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once (memory bound)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    add_renamed(parser, "--output", "--out", type=Path, required=True, help="output folder")
    return parser


def _sample(args: argparse.Namespace) -> int:
    import torch

    from ..jobs.sample import sample_to_folder

    options = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = sample_to_folder(args.pipeline, parse_labels(args.labels), args.output,
                             num_images_per_label=args.images_per_class, seed=args.seed, batch_size=args.batch_size,
                             device=device, dtype=getattr(torch, args.dtype) if args.dtype else None, **options)
    print(f"wrote {len(paths)} images ({{class id}}_{{i}}.png) and grid.png to {args.output}")
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq sample") -> int:
    return run(build_parser(prog), argv, _sample, errors=(ValueError, TypeError, OSError))
