"""``fullvq <command> ...``: one entry point; each command is a light module of ``fullvq.commands``
that parses its arguments and then runs a job of ``fullvq.jobs``.

Also runs as ``python -m fullvq.cli`` (and so under ``accelerate launch -m fullvq.cli``).
Nothing heavy (torch, diffusers, ...) is imported before a command has parsed its arguments, so
``fullvq --help`` and ``fullvq <command> --help`` answer at once.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv, prog)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fullvq.commands.demo", "run the built-in offline demo and write its figures"),
    "train-tokenizer": ("fullvq.commands.train_tokenizer", "train an image tokenizer from a YAML recipe"),
    "init-codebook": ("fullvq.commands.init_codebook",
                      "k-means codebook for the lc quantizer from a pretrained vision encoder"),
    "cache-tokens": ("fullvq.commands.cache_tokens", "encode a dataset into token shards with a trained tokenizer"),
    "train-generator": ("fullvq.commands.train_generator",
                        "train the class-conditional GPT or DiT on cached tokens from a YAML recipe"),
    "sample": ("fullvq.commands.sample", "generate images from a pipeline folder"),
    "eval": ("fullvq.commands.eval", "rFID / gFID and reconstruction metrics, offline-capable"),
    "convert": ("fullvq.commands.convert", "convert LlamaGen / FVQ / VQGAN-LC checkpoints into fullvq folders"),
    "app": ("fullvq.commands.app", "a web page (Gradio) to generate images and tokenize uploads with a model folder"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: fullvq <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `fullvq <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fullvq import __version__

        print(__version__)
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"fullvq: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(argv[1:], prog=f"fullvq {command}") or 0)


if __name__ == "__main__":
    sys.exit(main())
