"""``fullvq demo``: an offline check of the method that runs in about a minute on 2 CPU cores.

It fits a plain ``vq`` codebook and an ``fvq`` (VQBridge) codebook of the same size to the same
stream of continuous latents, with no autoencoder, and measures codebook usage over fresh
samples: the FVQ paper's mechanism in miniature (plain VQ leaves most codes dead, VQBridge
keeps nearly all alive). Then it round-trips a small ``FVQModel`` through ``save_pretrained`` /
``from_pretrained`` and ``export_plain``. Writes ``demo.json`` and ``usage.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fullvq.tokenizer import CodebookUsage, FVQModel, build_quantizer


def fit_codebook(name: str, codebook_size: int, dim: int, steps: int, seed: int) -> CodebookUsage:
    torch.manual_seed(seed)
    quantizer = build_quantizer(name, codebook_size=codebook_size, codebook_dim=dim)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-3)
    for _ in tqdm(range(steps), desc=f"fit {name} (K={codebook_size})", leave=False):
        loss = quantizer(torch.randn(32, dim, 8, 8)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    usage = CodebookUsage(codebook_size)
    with torch.no_grad():
        for _ in range(8):
            usage.update(quantizer(torch.randn(64, dim, 16, 16)).indices)
    return usage


def tokenizer_round_trip(out: Path) -> dict:
    model = FVQModel(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=32,
                     norm_num_groups=16, quantizer="fvq", codebook_size=1024, codebook_dim=16).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    indices = model.encode_indices(images)
    model.save_pretrained(out / "tokenizer")
    loaded = FVQModel.from_pretrained(out / "tokenizer").eval()
    plain = model.export_plain()
    return {
        "indices_shape": list(indices.shape),
        "reload_identical": bool(torch.equal(loaded.encode_indices(images), indices)),
        "export_plain_identical": bool(torch.equal(plain.encode_indices(images), indices)),
    }


def plot_usage(usages: dict[str, CodebookUsage], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usages), figsize=(5 * len(usages), 3.5), sharey=True)
    for ax, (name, usage) in zip(axes, usages.items()):
        counts = usage.counts.sort(descending=True).values.double()
        ax.bar(range(len(counts)), (counts / counts.sum()).numpy(), width=1.0)
        ax.set_title(f"{name}: {usage.usage:.1%} of {usage.codebook_size} codes used")
        ax.set_xlabel("code (sorted by frequency)")
    axes[0].set_ylabel("frequency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "fullvq demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("fullvq-demo"), help="output folder")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per quantizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    usages = {name: fit_codebook(name, args.codebook_size, 16, args.steps, args.seed) for name in ("vq", "fvq")}
    report = {name: usage.summary() for name, usage in usages.items()}
    report["tokenizer"] = tokenizer_round_trip(args.out)
    (args.out / "demo.json").write_text(json.dumps(report, indent=2))
    plot_usage(usages, args.out / "usage.png")

    for name, usage in usages.items():
        print(f"{name:>4}: {usage.usage:6.1%} of {usage.codebook_size} codes used, perplexity {usage.perplexity:7.1f}")
    print(f"tokenizer save/load and export_plain identical: {report['tokenizer']}")
    print(f"wrote {args.out / 'demo.json'}, {args.out / 'usage.png'}, {args.out / 'tokenizer'}")
    return 0
