"""``fullvq train-generator CONFIG [key=value ...]``: stage two from a YAML recipe (``fullvq.jobs.train_generator``).

Trains a class-conditional generator on a token cache written by ``fullvq cache-tokens``; also runs
on many GPUs or nodes as ``accelerate launch -m fullvq.cli train-generator CONFIG``. The recipe's
``head`` picks the generator:

- ``gpt`` (default): FullVQGPT over token ids; ``model`` holds ``FullVQGPTConfig`` arguments, plus
  ``size: B|L|XL|XXL|XXXL|3B`` to start from a LlamaGen size. Ends with a ``FullVQPipeline``.
- ``dit`` (DDPM, epsilon prediction) or ``flow`` (flow matching, velocity prediction): diffusers'
  ``DiTTransformer2DModel`` over the quantized latents (the cache needs ``--latents``); ``model``
  holds ``size: S|B|L|XL``, ``patch_size`` and any ``DiTTransformer2DModel`` argument. Ends with a
  ``LatentFlowPipeline``.

Other sections: ``tokens`` (the cache folder), ``tokenizer`` (optional: defaults to the tokenizer
the cache records, whose sha256 must still match) and ``train``. Codebook size, grid, code
dimension and ``num_classes`` come from the cache. The run ends with ``<output_dir>/model`` (the
generator) and ``<output_dir>/pipeline`` (tokenizer + generator + class names). See ``configs/generator/``.
"""

from __future__ import annotations

import argparse

from ..config import ConfigError
from . import recipe_parser, run


def build_parser(prog: str) -> argparse.ArgumentParser:
    return recipe_parser(prog, __doc__, "configs/generator/", "train.max_steps=100 tokens=tokens/demo model.size=B")


def _train_generator(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..jobs.train_generator import GeneratorTrainConfig, train_generator

    train_generator(load_config(GeneratorTrainConfig, args.config, args.overrides))
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq train-generator") -> int:
    return run(build_parser(prog), argv, _train_generator, errors=(ConfigError, FloatingPointError))
