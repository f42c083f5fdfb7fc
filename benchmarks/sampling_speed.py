"""Images/s of class-conditional sampling (``fullvq.generator.sample``), against the memory-bandwidth bound.

For each model (LlamaGen's GPT-B shape and a small one, codebook 16,384, 1,000 classes) and each
mode (KV cache or full recompute per token, with or without classifier-free guidance) this times
``sample()`` on randomly initialised weights (speed does not depend on them).

The bound: a decoding step must read every weight it multiplies by at least once (all but the two
embedding tables, whose few looked-up rows are negligible), so a batch of B images of T tokens
takes at least ``T x weight_bytes / bandwidth`` seconds, i.e. at most
``B x bandwidth / (T x weight_bytes)`` images/s. The same bound holds with guidance (cond and
uncond rows share one read of the weights). ``bandwidth`` is measured here (best of a few
read-only reductions over a large tensor) unless ``--bandwidth-gbs`` names one (e.g. a GPU's
datasheet figure); the table's last column is measured images/s / bound.

    python benchmarks/sampling_speed.py                       # CPU: float32, batch 4, 8x8 = 64 tokens
    python benchmarks/sampling_speed.py --threads 1           # steadier on a CPU shared with other jobs
    python benchmarks/sampling_speed.py --device cuda         # GPU: bf16, batch 64, 16x16 = 256 tokens

Writes ``<out>-<device>.json``, ``.md`` (the table) and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

MODELS = {
    "GPT-B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6),
}
# (name, use_cache, guidance_scale)
MODES = [("kv-cache", True, 1.0), ("kv-cache + cfg", True, 2.0), ("no cache", False, 1.0),
         ("no cache + cfg", False, 2.0)]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, gigabytes: float, repeats: int = 5) -> float:
    """Best read bandwidth (bytes/s) of a sum over a ``gigabytes``-sized float32 tensor."""
    x = torch.ones(int(gigabytes * 1e9 / 4), device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of every weight a decoding step multiplies by (all but the embedding tables)."""
    skip = {id(model.class_embedding.weight), id(model.model.embed_tokens.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def time_sampling(model, batch_size: int, use_cache: bool, guidance_scale: float, device: str, repeats: int) -> float:
    from fullvq.generator import sample

    labels = torch.arange(batch_size, device=device) % model.config.num_classes
    best = float("inf")
    for _ in range(repeats):
        generator = torch.Generator(device="cpu").manual_seed(0)
        _sync(device)
        start = time.perf_counter()
        sample(model, labels, guidance_scale=guidance_scale, temperature=1.0, generator=generator,
               use_cache=use_cache)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def write_report(results: dict, out: Path) -> None:
    lines = [
        f"Sampling {results['batch_size']} images of {results['grid']}x{results['grid']} = {results['num_tokens']} "
        f"tokens (codebook {results['codebook_size']:,}) on {results['device_name']}, {results['dtype']}, "
        f"{results['threads']} threads. Bound: weights read once per token at {results['bandwidth_gbs']:.1f} GB/s "
        f"({results['bandwidth_source']}).",
        "",
        "| model | weights (MB) | mode | s / batch | images/s | bound images/s | of bound |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['model']} | {row['weight_bytes'] / 1e6:.0f} | {row['mode']} | {row['seconds']:.2f} | "
            f"{row['images_per_second']:.2f} | {row['bound_images_per_second']:.2f} | {row['fraction_of_bound']:.1%} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [f"{r['model']}\n{r['mode']}" for r in rows]
    ax.bar(range(len(rows)), [r["images_per_second"] for r in rows], label="measured")
    ax.scatter(range(len(rows)), [r["bound_images_per_second"] for r in rows], color="k", marker="_", s=400,
               label="bandwidth bound", zorder=3)
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(f"{results['device_name']}, {results['dtype']}, batch {results['batch_size']}, "
                 f"{results['num_tokens']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on GPU, 4 on CPU")
    parser.add_argument("--grid", type=int, default=None, help="token grid side; default: 16 on GPU, 8 on CPU")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=[m[0] for m in MODES], choices=[m[0] for m in MODES])
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=None, help="best of N timings; default: 3 on GPU, 1 on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 is steadier on a machine shared with other jobs")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="memory bandwidth for the bound (GB/s); default: measured here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling_speed"))
    args = parser.parse_args()

    from fullvq.generator import FullVQGPT, FullVQGPTConfig

    gpu = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if gpu else "float32")
    batch_size = args.batch_size or (64 if gpu else 4)
    grid = args.grid or (16 if gpu else 8)
    repeats = args.repeats or (3 if gpu else 1)
    out = args.out.with_name(f"{args.out.name}-{'cuda' if gpu else 'cpu'}")
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.bandwidth_gbs is not None:
        bandwidth, source = args.bandwidth_gbs * 1e9, "given"
    else:
        bandwidth, source = measure_bandwidth(args.device, 4.0 if gpu else 1.0), "measured: float32 sum"
    device_name = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine() or "CPU")
    results = {"device": args.device, "device_name": device_name, "dtype": dtype_name, "batch_size": batch_size,
               "grid": grid, "num_tokens": grid * grid, "codebook_size": args.codebook_size,
               "threads": torch.get_num_threads(), "bandwidth_gbs": bandwidth / 1e9, "bandwidth_source": source,
               "repeats": repeats, "rows": []}
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s ({source})", flush=True)
    for name in args.models:
        torch.manual_seed(0)
        config = FullVQGPTConfig(codebook_size=args.codebook_size, num_classes=1000, grid_size=grid, **MODELS[name])
        model = FullVQGPT(config).to(args.device, DTYPES[dtype_name]).eval()
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # not the zero init: real-looking distributions
        size = weight_bytes(model)
        bound = batch_size * bandwidth / (grid * grid * size)
        if gpu:  # kernels, allocator and cuBLAS heuristics warm up on one short run
            time_sampling(model, batch_size, True, 2.0, args.device, 1)
        for mode, use_cache, guidance_scale in MODES:
            if mode not in args.modes:
                continue
            seconds = time_sampling(model, batch_size, use_cache, guidance_scale, args.device, repeats)
            row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": size,
                   "mode": mode, "use_cache": use_cache, "guidance_scale": guidance_scale, "seconds": seconds,
                   "images_per_second": batch_size / seconds, "bound_images_per_second": bound,
                   "fraction_of_bound": batch_size / seconds / bound}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        del model
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
