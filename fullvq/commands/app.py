"""``fullvq app PIPELINE_OR_TOKENIZER``: a Gradio page to generate images by class and to tokenize
uploads (``fullvq.jobs.app``), on CPU by default.

Needs the app extra: ``pip install -e ".[app]"``. Serves http://127.0.0.1:7860 unless told otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from . import command_parser, run


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(prog, __doc__)
    parser.add_argument("model", type=Path, metavar="PIPELINE_OR_TOKENIZER",
                        help="a pipeline folder (model_index.json) or a tokenizer folder (config.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default: cpu)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    return parser


def _app(args: argparse.Namespace) -> int:
    from ..io import local_folder_or_hub_id

    # A local folder only: "no such folder" for a missing one (e.g. fullvq-demo/generator-run/pipeline).
    folder = local_folder_or_hub_id(args.model, "pipeline or tokenizer", hub=False)
    if importlib.util.find_spec("gradio") is None:
        raise ValueError('gradio is not installed; install the app extra: pip install -e ".[app]"')
    from ..jobs.app import launch

    launch(folder, host=args.host, port=args.port, device=args.device, share=args.share)
    return 0


def main(argv: list[str] | None = None, prog: str = "fullvq app") -> int:
    return run(build_parser(prog), argv, _app, errors=(ValueError, FileNotFoundError))
