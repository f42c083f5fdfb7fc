"""``fullvq sample PIPELINE_DIR --labels ... --out DIR``: generate images from a pipeline folder.

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
import sys
from pathlib import Path

import torch


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
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", metavar="PIPELINE_DIR", help="pipeline folder (model_index.json) or hub id")
    parser.add_argument("--labels", nargs="+", required=True, help="class ids or names (see above)")
    parser.add_argument("--num-per-label", type=int, default=1, help="images per label (default 1)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance; 1 = off")
    parser.add_argument("--guidance-schedule", choices=("constant", "linear"), default=None, help="GPT (default constant)")
    parser.add_argument("--temperature", type=float, default=None, help="GPT: 0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="GPT: 0 = off (default)")
    parser.add_argument("--top-p", type=float, default=None, help="GPT: 1 = off (default)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="DiT / flow: scheduler steps (50)")
    parser.add_argument("--snap-to-codebook", action="store_const", const=True, default=None,
                        help="DiT / flow: decode the nearest codes of the generated latents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once (memory bound)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None, prog: str = "fullvq sample") -> int:
    args = build_parser(prog).parse_args(argv)
    from fullvq.pipelines import load_pipeline
    from fullvq.pipelines.base import sampling_kwargs
    from fullvq.training import save_image_grid
    from torchvision.utils import save_image

    labels = parse_labels(args.labels)
    options = {name: getattr(args, name) for name in ("guidance_schedule", "temperature", "top_k", "top_p",
                                                      "num_inference_steps", "snap_to_codebook")}
    options = {name: value for name, value in options.items() if value is not None}
    try:
        pipe = load_pipeline(args.pipeline, dtype=getattr(torch, args.dtype)).to(args.device)
        accepted = sampling_kwargs(pipe, **options)
        foreign = [name for name in options if name not in accepted]
        if foreign:
            flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
            raise ValueError(f"{flags} do not apply to a {type(pipe).__name__}; drop them")
        ids = pipe.get_label_ids(labels)
        images = pipe(
            ids,
            num_images_per_label=args.num_per_label,
            guidance_scale=args.guidance_scale,
            **options,
            generator=torch.Generator().manual_seed(args.seed),
            batch_size=args.batch_size,
            output_type="pt",
        ).images
    except (ValueError, TypeError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    written: dict[int, int] = {}  # class id -> images written, so a repeated label does not overwrite
    for label, image in zip((i for i in ids for _ in range(args.num_per_label)), images):
        index = written.get(label, 0)
        save_image(image, args.out / f"{label}_{index}.png")
        written[label] = index + 1
    save_image_grid(list((images * 2 - 1).split(args.num_per_label)), args.out / "grid.png")
    print(f"wrote {len(images)} images ({{class id}}_{{i}}.png) and grid.png to {args.out}")
    return 0


__all__ = ["main", "parse_labels"]
