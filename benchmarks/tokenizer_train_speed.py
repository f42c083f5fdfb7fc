"""Images/s and peak memory of one tokenizer training step, as `fullvq train-tokenizer` runs it.

Each case builds the real stage (FVQModel + TokenizerLoss with LPIPS and the PatchGAN active)
through the shared Trainer and times ``TokenizerStage.training_step`` on synthetic images, in a
fresh process so peak memory is its own (RSS on CPU, the CUDA allocator's peak on GPU). LPIPS
uses a randomly initialised VGG here: the same compute as the real weights, no download.

    python benchmarks/tokenizer_train_speed.py                          # CPU defaults (small batches)
    python benchmarks/tokenizer_train_speed.py --device cuda --batch-size 32 --mixed-precision bf16

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantizer_speed import _current_rss_bytes, _rss_bytes  # noqa: E402

VQ16 = dict(sample_size=256, block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256)
SMALL = dict(sample_size=32, block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=32,
             norm_num_groups=16)
CASES = {
    "small-fvq-1024x16 (32 px)": (SMALL, 32, dict(quantizer="fvq", codebook_size=1024, codebook_dim=16)),
    "vq16-fvq-16384x256 (256 px)": (VQ16, 256, dict(quantizer="fvq", codebook_size=16384, codebook_dim=256)),
    "vq16-fvq-262144x256 (256 px)": (VQ16, 256, dict(quantizer="fvq", codebook_size=262144, codebook_dim=256)),
    "vq16-llamagen-16384x8 (256 px)": (VQ16, 256, dict(quantizer="vq", codebook_size=16384, codebook_dim=8,
                                                        quantizer_kwargs={"l2_norm": True})),
}


class SyntheticImages(torch.utils.data.Dataset):
    def __init__(self, resolution: int, size: int = 1024):
        self.resolution, self.size = resolution, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"pixel_values": torch.rand(3, self.resolution, self.resolution) * 2 - 1, "label": 0}


def measure(case: str, batch_size: int, device: str, mixed_precision: str, repeats: int) -> dict:
    import os

    from fullvq.config import build_dataclass
    from fullvq.jobs.loop import Trainer
    from fullvq.jobs.train_tokenizer import TokenizerStage, TokenizerTrainConfig

    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    architecture, resolution, quantizer = CASES[case]
    output_dir = tempfile.mkdtemp()
    config = build_dataclass(TokenizerTrainConfig, {
        "model": {**architecture, **quantizer},
        "loss": {"perceptual_weight": 1.0, "perceptual_random_backbone": True, "gan_weight": 0.5, "gan_start_step": 0},
        "data": {"source": "synthetic", "resolution": resolution},
        "train": {"output_dir": output_dir, "batch_size": batch_size, "max_steps": 100, "tracker": "none",
                  "mixed_precision": mixed_precision, "num_workers": 0},
    })
    dataset = SyntheticImages(resolution)
    trainer = Trainer(config.train, lambda t: TokenizerStage(t, config, dataset), dataset, full_config=config)
    trainer.prepare()
    stage, acc = trainer.stage, trainer.accelerator
    batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution, device=acc.device) * 2 - 1}
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    stage.training_step(batch, 1)  # warm-up
    sync()
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = 0
    else:
        base = _current_rss_bytes()
    times = []
    for step in range(repeats):
        start = time.perf_counter()
        stage.training_step(batch, step + 2)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if acc.device.type == "cuda" else _rss_bytes() - base
    seconds = min(times)
    return {"case": case, "batch_size": batch_size, "mixed_precision": mixed_precision,
            "seconds_per_step": seconds, "images_per_second": batch_size / seconds,
            "peak_memory_gb": peak / 1e9,
            "memory_kind": "allocated" if acc.device.type == "cuda" else "rss above start"}


def _worker(queue, args):
    try:
        queue.put(measure(*args))
    except Exception as error:  # report, don't hang the parent
        queue.put({"case": args[0], "error": f"{type(error).__name__}: {error}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step (default: 32 for the small case, 2 for VQ-16 on CPU, 32 on GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: no on CPU, bf16 on GPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tokenizer_train_speed"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    precision = args.mixed_precision or ("bf16" if on_gpu else "no")
    rows = []
    ctx = mp.get_context("spawn")
    for case in args.cases:
        batch = args.batch_size or (32 if on_gpu or case.startswith("small") else 2)
        queue = ctx.Queue()
        process = ctx.Process(target=_worker, args=(queue, (case, batch, args.device, precision, args.repeats)))
        process.start()
        process.join()
        row = queue.get() if not queue.empty() else {"case": case, "error": f"exit code {process.exitcode}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name() if on_gpu else (platform.processor() or "CPU")
    results = {"device": args.device, "device_name": device_name, "threads": torch.get_num_threads(), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [f"One training step (generator + discriminator, LPIPS on) on {device_name} "
             f"({torch.get_num_threads()} threads).", "",
             "| case | batch | precision | s / step | images / s | peak memory (GB) |", "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | | | {row['error']} | | |")
        else:
            lines.append(f"| {row['case']} | {row['batch_size']} | {row['mixed_precision']} | "
                         f"{row['seconds_per_step']:.2f} | {row['images_per_second']:.2f} | "
                         f"{row['peak_memory_gb']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
