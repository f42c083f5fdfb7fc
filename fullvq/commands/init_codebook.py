"""``fullvq init-codebook``: a k-means codebook for the lc quantizer (VQGAN-LC) from a pretrained vision
encoder's patch features (``fullvq.jobs.init_codebook``).

VQGAN-LC's recipe: ``--encoder openai/clip-vit-large-patch14 --per-class --num-codes 100000
--pool-factor 4`` on ImageNet train.
"""

from __future__ import annotations

import argparse

from . import add_renamed, command_parser, int_at_least, run

# The choices the job checks again (fullvq.tokenizer.kmeans.INITS, patch_features.FEATURE_SPACES); a
# test keeps them equal, so --help stays light.
INITS = ("k-means++", "random")
FEATURE_SPACES = ("hidden", "projected")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    parser.add_argument("--encoder", required=True, help="transformers vision backbone: hub id or local folder "
                        "(CLIP vision, DINOv2, SigLIP, ViT)")
    parser.add_argument("--data", required=True,
                        help="image folder (one sub-folder per class), hub dataset name or 'demo'")
    parser.add_argument("--num-codes", type=int_at_least(1), required=True, help="codebook size N")
    add_renamed(parser, "--output", "--out", required=True,
                help="output .safetensors file (key 'codebook', float32 N x D)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--per-class", action="store_true", help="cluster each class separately (N split over classes)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    add_renamed(parser, "--resolution", "--image-size", type=int, default=None,
                help="encoder input side in pixels (default: its processor / config)")
    parser.add_argument("--feature-space", choices=FEATURE_SPACES, default="hidden",
                        help="hidden: last hidden state (default); projected: CLIP's projection head")
    parser.add_argument("--pool-factor", type=int_at_least(1), default=1,
                        help="average-pool the patch grid this much per side (VQGAN-LC: 4)")
    parser.add_argument("--features-per-image", type=int, default=None, help="random patch features kept per image")
    parser.add_argument("--max-images", type=int, default=None, help="random images used (per class with --per-class)")
    parser.add_argument("--iters", type=int_at_least(1), default=20, help="maximum k-means updates (default: 20)")
    parser.add_argument("--tol", type=float, default=1e-4, help="stop when inertia falls by less than this fraction")
    parser.add_argument("--init", choices=INITS, default="k-means++", help="centre initialisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="encoder weights dtype (k-means always runs in float32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--chunk-size", type=int, default=16384, help="features per k-means assignment chunk")
    parser.add_argument("--feature-cache", default=None,
                        help="global mode: keep features in this .npy memory map, not RAM")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder (default: its own)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _init_codebook(args: argparse.Namespace) -> int:
    import torch

    from ..jobs.init_codebook import init_codebook, stats_paths

    stats = init_codebook(
        args.encoder, args.data, args.num_codes, args.output, per_class=args.per_class, overwrite=args.overwrite,
        split=args.split, image_size=args.resolution, feature_space=args.feature_space,
        pool_factor=args.pool_factor, features_per_image=args.features_per_image, max_images=args.max_images,
        num_iters=args.iters, tol=args.tol, init=args.init, seed=args.seed, device=args.device,
        dtype=getattr(torch, args.dtype), batch_size=args.batch_size, num_workers=args.num_workers,
        chunk_size=args.chunk_size, feature_cache=args.feature_cache, image_column=args.image_column,
        label_column=args.label_column, cache_dir=args.cache_dir, progress=not args.no_progress,
    )
    sizes = stats["cluster_sizes"]
    print(
        f"wrote {stats['codebook']}: {stats['num_codes']} codes x {stats['feature_dim']} from {stats['features']} "
        f"features of {stats['images']} images; inertia/feature {stats['inertia_per_feature']:.4g}, "
        f"empty clusters {sizes['empty_clusters']}; stats in {stats_paths(stats['codebook'])[0]}\n"
        f"use it with build_quantizer('lc', codebook_size={stats['num_codes']}, "
        f"feature_dim={stats['feature_dim']}, ...).load_codebook({stats['codebook']!r})"
    )
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq init-codebook") -> int:
    return run(build_parser(prog), argv, _init_codebook, errors=(ValueError, FileNotFoundError, FileExistsError))
