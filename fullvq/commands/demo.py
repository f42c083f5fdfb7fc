"""``fullvq demo``: both stages end to end on the built-in MNIST digits, offline, on a CPU (``fullvq.jobs.demo``).

1. trains a small FVQ tokenizer (VQBridge codebook of 1,024 codes, 32 px -> 8 x 8 tokens);
2. caches every digit's tokens and trains a small class-conditional GPT on them;
3. writes the pipeline folder and samples every class from it;
4. measures: codebook usage / perplexity / dead codes over every token of the set, reconstruction
   PSNR, rFID and gFID (offline Inception weights), and the class accuracy of the generated digits
   as judged by a small digit classifier trained on the same data.

Everything lands in ``--output``: ``pipeline/`` (load with ``FullVQPipeline.from_pretrained``),
``samples.png`` (a row per class), ``reconstructions.png``, ``usage.png``, ``demo.json``, and
the two training runs. Re-running with the same ``--output`` resumes or reuses what is there.
``--fast`` shrinks every step (a check that runs in about a minute; its figures mean little).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_renamed, command_parser, run


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    add_renamed(parser, "--output", "--out", type=Path, default=Path("fullvq-demo"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="tiny sizes and a few steps (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from ..jobs.demo import run_demo

    run_demo(args.output, fast=args.fast, seed=args.seed)
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq demo") -> int:
    return run(build_parser(prog), argv, _demo)
