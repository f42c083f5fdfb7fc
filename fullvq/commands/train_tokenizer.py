"""``fullvq train-tokenizer CONFIG [key=value ...]``: stage one from a YAML recipe (``fullvq.jobs.train_tokenizer``).

Also runs on many GPUs or nodes as ``accelerate launch -m fullvq.cli train-tokenizer CONFIG``.
The recipe's sections: ``model`` (``FVQModel`` arguments), ``loss`` (``TokenizerLoss``
arguments), ``data`` and ``train`` (``TrainConfig``); ``codebook_path`` fills an ``lc``
codebook. See ``configs/tokenizer/``.
"""

from __future__ import annotations

import argparse

from ..config import ConfigError
from . import recipe_parser, run


def build_parser(prog: str) -> argparse.ArgumentParser:
    return recipe_parser(prog, __doc__, "configs/tokenizer/", "train.max_steps=100 model.codebook_size=4096")


def _train_tokenizer(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..jobs.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    train_tokenizer(load_config(TokenizerTrainConfig, args.config, args.overrides))
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq train-tokenizer") -> int:
    return run(build_parser(prog), argv, _train_tokenizer, errors=(ConfigError, FloatingPointError))
