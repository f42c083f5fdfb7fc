"""Forward + backward time and peak memory of each quantizer at large codebook sizes.

Quantizes ``--tokens`` latents of ``--dim`` channels against K codes for every K in ``--sizes``,
for each quantizer family and for a plain full-distance-matrix implementation (the N x K
matrix that taming / LlamaGen build). Also times the bare GEMM ``z @ C^T``, the lower bound of
any exact search. Each measurement runs in a fresh process so peak memory (RSS on CPU, the CUDA
allocator's peak on GPU) is its own.

    python benchmarks/quantizer_speed.py                      # this machine, K = 16k / 65k / 262k
    python benchmarks/quantizer_speed.py --device cuda        # on a GPU

Writes ``<out>.json``, ``<out>.md`` (the README table) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

FAMILIES = ("search", "full-matrix", "vq", "simvq", "lc", "fvq")  # "search": nearest_code alone


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def full_matrix_step(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The textbook implementation: the whole N x K distance matrix, then argmin."""
    distances = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
    indices = distances.argmin(dim=1)
    z_q = codebook[indices]
    loss = (z_q - z.detach()).pow(2).mean() + 0.25 * (z - z_q.detach()).pow(2).mean()
    return z + (z_q - z).detach(), loss


def measure(family: str, num_codes: int, tokens: int, dim: int, device: str, repeats: int) -> dict:
    from fullvq.tokenizer.quantizers import build_quantizer

    torch.manual_seed(0)
    side = int(tokens**0.5)
    z = torch.randn(tokens // (side * side), dim, side, side, device=device, requires_grad=True)
    if family == "search":
        from fullvq.tokenizer.quantizers import nearest_code

        codebook = torch.randn(num_codes, dim, device=device)
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, dim).contiguous()

        def step():
            nearest_code(flat, codebook)
    elif family == "full-matrix":
        codebook = torch.nn.Parameter(torch.randn(num_codes, dim, device=device))

        def step():
            flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
            quantized, loss = full_matrix_step(flat, codebook)
            (quantized.sum() * 0 + loss).backward()
    else:
        kwargs = {"feature_dim": dim} if family == "lc" else {}
        quantizer = build_quantizer(family, codebook_size=num_codes, codebook_dim=dim, **kwargs).to(device)
        if family == "lc":
            quantizer.load_codebook(torch.randn(num_codes, dim))

        def step():
            out = quantizer(z)
            (out.quantized.sum() * 0 + out.loss).backward()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step()  # warm-up (allocations, kernels)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_bytes()
    return {"family": family, "codebook_size": num_codes, "seconds": min(times),
            "extra_memory_gb": max(0, peak - base) / 1e9}


def measure_gemm(num_codes: int, tokens: int, dim: int, device: str, repeats: int) -> float:
    z = torch.randn(tokens, dim, device=device)
    codebook = torch.randn(num_codes, dim, device=device)
    out = torch.empty(tokens, 4096, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for k0 in range(0, num_codes, 4096):  # blocked so the bound itself needs no N x K memory
            chunk = codebook[k0 : k0 + 4096]
            torch.mm(z, chunk.t(), out=out[:, : chunk.shape[0]])
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _worker(queue, args):
    queue.put(measure(*args))


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_worker, args=(queue, args))
    process.start()
    process.join()
    if process.exitcode != 0:
        return {"family": args[0], "codebook_size": args[1], "error": f"exit code {process.exitcode} (out of memory?)"}
    return queue.get()


def write_report(results: dict, out: Path) -> None:
    rows = results["rows"]
    lines = [
        f"Quantizing {results['tokens']} tokens of dim {results['dim']}, forward + backward, on "
        f"{results['device_name']} ({results['threads']} threads). Extra memory: peak over the inputs.",
        "",
        "| quantizer | K | time (s) | vs GEMM bound | extra memory (GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['family']} | {row['codebook_size']:,} | {row['error']} | | |")
            continue
        bound = results["gemm_seconds"][str(row["codebook_size"])]
        lines.append(
            f"| {row['family']} | {row['codebook_size']:,} | {row['seconds']:.2f} | "
            f"{row['seconds'] / bound:.2f}x | {row['extra_memory_gb']:.2f} |"
        )
    lines.append("")
    lines.append("GEMM bound (z @ C^T alone): " + ", ".join(
        f"K={int(k):,}: {v:.2f} s" for k, v in results["gemm_seconds"].items()))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for family in results["families"]:
        ok = [r for r in rows if r["family"] == family and "error" not in r]
        sizes = [r["codebook_size"] for r in ok]
        ax_time.plot(sizes, [r["seconds"] for r in ok], marker="o", label=family)
        ax_mem.plot(sizes, [r["extra_memory_gb"] for r in ok], marker="o", label=family)
    sizes = [int(k) for k in results["gemm_seconds"]]
    ax_time.plot(sizes, list(results["gemm_seconds"].values()), "k--", label="GEMM bound")
    for ax, title in ((ax_time, "forward + backward (s)"), (ax_mem, "extra memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantizer_speed"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    results = {"tokens": args.tokens, "dim": args.dim, "device": args.device, "device_name": device_name,
               "threads": torch.get_num_threads(), "families": args.families, "rows": [], "gemm_seconds": {}}
    for num_codes in args.sizes:
        gemm = measure_gemm(num_codes, args.tokens, args.dim, args.device, args.repeats)
        results["gemm_seconds"][str(num_codes)] = gemm
        for family in args.families:
            row = run_isolated(family, num_codes, args.tokens, args.dim, args.device, args.repeats)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    print(args.out.with_suffix(".md").read_text())
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
