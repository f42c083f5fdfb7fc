"""Model cards: the ``README.md`` with Hub metadata that fullvq writes into every model and pipeline folder.

A card is built from two sources: what the folder says about itself (``model_index.json`` /
``config.json`` and the weights' shapes) and what the job that made it knows (the command, the
recipe, the data, metrics). The job's facts are kept in the card's own metadata (under ``fullvq:``),
so a later job that regenerates the card (``eval`` adding its figures) keeps them: cards are
rewritten whole, never appended to.

    write_model_card(folder, command=command_line(), recipe=config, data="imagenet-1k")
    write_model_card(folder, report=eval_report)      # eval: same card, with its metrics
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from .io import write_text

CARD_NAME = "README.md"
FACTS_KEY = "fullvq"
DEFAULT_LICENSE = "apache-2.0"

QUANTIZERS = {
    "fvq": "FVQ: the codebook passes through VQBridge (a small transformer over groups of codes), so every code "
           "gets gradients and stays in use",
    "lc": "VQGAN-LC: a frozen codebook of k-means centres of pretrained features, mapped by a trained projector",
    "vq": "plain vector quantization (nearest code, straight-through gradients)",
    "simvq": "SimVQ: a frozen codebook mapped by a trained linear layer",
    "residual": "residual quantization (several codes per cell)",
    "multiscale": "multi-scale residual quantization",
}
# Figures shown first (and put into the Hub's model-index) for each kind of report.
# Facts about a metrics section, shown in its heading rather than as rows.
SECTION_FACTS = ("data", "images", "report")
HEADLINE = {"reconstruction": ("rfid", "psnr", "ssim", "lpips", "codebook_usage_percent", "perplexity"),
            "generation": ("fid", "inception_score", "kid", "precision", "recall")}


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would type it (``fullvq ...`` when run through the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("fullvq", "cli.py", "__main__.py"):
        argv = ["fullvq", *argv[1:]]
    return shlex.join(argv)


def usage_figures(usage) -> dict:
    """A ``CodebookUsage``'s counts as a card's metrics (usage in percent, perplexity, dead codes, tokens)."""
    return {"codebook_usage_percent": 100 * float(usage.usage), "perplexity": float(usage.perplexity),
            "dead_codes": int(usage.dead_codes), "tokens": int(usage.total)}


def describe_folder(folder: str | os.PathLike) -> dict:
    """What a folder fullvq wrote holds: ``{"kind": "pipeline" | "tokenizer" | "gpt", ...architecture}``.

    Raises ``ValueError`` for a folder with neither ``model_index.json`` nor a fullvq ``config.json``.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        name = index.get("_class_name")
        facts = {"kind": "pipeline", "class": name[-1] if isinstance(name, list) else name,
                 "sample_size": index.get("sample_size"), "id2label": index.get("id2label") or {},
                 "tokenizer": describe_folder(folder / "tokenizer")}
        if (folder / "gpt").is_dir():
            facts["generator"] = describe_folder(folder / "gpt")
        elif (folder / "transformer").is_dir():
            config = _read_json(folder / "transformer" / "config.json")
            scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
            facts["generator"] = {"kind": "transformer", "class": config.get("_class_name"),
                                  "num_layers": config.get("num_layers"),
                                  "num_classes": config.get("num_embeds_ada_norm"),
                                  "width": config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0),
                                  "scheduler": scheduler.get("_class_name"),
                                  "parameters": _parameter_count(folder / "transformer")}
        return facts
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if "quantizer" in config:
        levels = len(config.get("block_out_channels") or [1])
        factor = 2 ** (levels - 1)
        return {"kind": "tokenizer", "quantizer": config["quantizer"], "codebook_size": config.get("codebook_size"),
                "codebook_dim": config.get("codebook_dim"), "quantizer_kwargs": config.get("quantizer_kwargs") or {},
                "sample_size": config.get("sample_size"), "downsample_factor": factor,
                "grid": config["sample_size"] // factor if config.get("sample_size") else None,
                "block_out_channels": config.get("block_out_channels"), "parameters": _parameter_count(folder)}
    if config.get("model_type") == "fullvq_gpt":
        return {"kind": "gpt", "codebook_size": config.get("codebook_size"), "num_classes": config.get("num_classes"),
                "grid_size": config.get("grid_size"), "hidden_size": config.get("hidden_size"),
                "num_hidden_layers": config.get("num_hidden_layers"),
                "num_attention_heads": config.get("num_attention_heads"), "parameters": _parameter_count(folder)}
    raise ValueError(f"{folder} holds no fullvq model (no model_index.json, and no config.json of an FVQModel or "
                     "FullVQGPT); pass a folder written by fullvq's save_pretrained")


# The sub-folders a run writes its results into; their own names say nothing about the model.
RUN_OUTPUT_NAMES = ("model", "pipeline")


def folder_name(folder: str | os.PathLike) -> str:
    """A model folder's name for people: its own, or its run folder's for a run's ``model/`` or
    ``pipeline/`` (``runs/fvq-16k/model`` -> ``fvq-16k``; ``llamagen-vq16`` -> ``llamagen-vq16``)."""
    path = Path(folder).resolve()
    return (path.parent.name or path.name) if path.name in RUN_OUTPUT_NAMES else path.name


def read_card_facts(folder: str | os.PathLike) -> dict:
    """The job facts kept in ``folder``'s card (``{}`` when it has no card, or a card fullvq did not write)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    facts = ModelCard.load(path).data.to_dict().get(FACTS_KEY)
    return dict(facts) if isinstance(facts, dict) else {}


def write_model_card(folder: str | os.PathLike, *, command: str | None = None, recipe: dict | None = None,
                     data: str | None = None, metrics: dict | None = None, report: dict | None = None,
                     source: str | None = None, license: str | None = None, repo_id: str | None = None) -> Path:
    """Write (or rewrite) ``folder/README.md``: Hub metadata, architecture, codebook, recipe, metrics, a snippet.

    Args:
        folder: a pipeline, tokenizer or GPT folder fullvq wrote.
        command: the command that made the folder (see :func:`command_line`).
        recipe: the resolved training config (shown as YAML).
        data: where the training images came from.
        metrics: ``{section: {name: value}}``, e.g. ``{"training": {"codebook_usage_percent": 99.5}}``.
        report: an ``eval`` report (``report.json``'s content); its figures replace that task's earlier ones.
        source: what the weights were converted from (converted checkpoints).
        license: the Hub license id (default: what the card had, else ``apache-2.0``).
        repo_id: the Hub repo the folder will be uploaded to, used in the snippets (default: the folder path).

    Facts not given are kept from the folder's existing card. Returns the card's path.
    """
    from huggingface_hub import EvalResult, ModelCardData

    folder = Path(folder)
    described = describe_folder(folder)
    facts = read_card_facts(folder)
    given = {"command": command, "recipe": recipe, "data": data, "source": source, "license": license,
             "repo_id": repo_id}
    facts.update({key: value for key, value in given.items() if value is not None})
    facts["metrics"] = {**(facts.get("metrics") or {}), **(metrics or {})}
    if report is not None:
        task, figures = _report_figures(report)
        facts["metrics"][task] = figures
    if not facts["metrics"]:
        del facts["metrics"]
    if "recipe" not in facts and (folder / "train_config.yaml").is_file():
        facts["recipe"] = yaml.safe_load((folder / "train_config.yaml").read_text())
    facts["kind"] = described["kind"]
    title = facts["repo_id"].rsplit("/", 1)[-1] if facts.get("repo_id") else folder_name(folder)
    results = [EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                          metric_value=value, metric_name=name)
               for task_type, dataset, metric, name, value in _hub_results(facts.get("metrics") or {})]
    card_data = ModelCardData(
        library_name="diffusers" if described["kind"] == "pipeline" else "fullvq",
        pipeline_tag="image-to-image" if described["kind"] == "tokenizer" else "unconditional-image-generation",
        tags=_tags(described), license=facts.get("license", DEFAULT_LICENSE), model_name=title,
        eval_results=results or None, **{FACTS_KEY: _plain(facts)},
    )
    text = f"---\n{card_data.to_yaml()}\n---\n\n{_body(folder, described, facts)}"
    return write_text(folder / CARD_NAME, text)


def add_report_to_card(evaluated, report: dict) -> Path | None:
    """After ``eval``: rewrite the evaluated folder's card with the report's figures. ``evaluated`` is what
    was evaluated (a folder path, or a hub id or in-memory model, which are left alone). Returns the card's path,
    or None when there was no local folder to update or it could not be written (a warning says why)."""
    import warnings

    if not isinstance(evaluated, (str, os.PathLike)) or not Path(evaluated).is_dir():
        return None
    try:
        return write_model_card(evaluated, report=report)
    except (OSError, ValueError) as error:  # a read-only or foreign folder must not fail a finished evaluation
        warnings.warn(f"the model card of {evaluated} was not updated: {error}", stacklevel=2)
        return None


def _body(folder: Path, described: dict, facts: dict) -> str:
    where = facts.get("repo_id") or str(folder)
    kind = described["kind"]
    lines = [f"# {_headline(described)}", "", f"Made with fullvq; {_made_by(facts)}. Loading it needs "
             "`pip install fullvq` (which brings torch, diffusers and transformers).", "", "## Use it", "",
             _snippet(described, where), ""]
    lines += ["## Architecture", "", *_architecture(described), ""]
    tokenizer = described["tokenizer"] if kind == "pipeline" else described if kind == "tokenizer" else None
    if tokenizer:
        lines += ["## Codebook", "", *_codebook(tokenizer, facts.get("metrics") or {}), ""]
    metrics = facts.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", ""]
        for section, figures in metrics.items():
            about = ", ".join(f"{key}: {figures[key]}" for key in SECTION_FACTS if figures.get(key) is not None)
            lines += [f"**{section}**" + (f" ({about})" if about else ""), "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {_number(value)} |" for name, value in figures.items() if name not in SECTION_FACTS]
            lines.append("")
    lines += ["## How it was made", ""]
    lines += [f"- data: {facts['data']}" if facts.get("data") else "- data: not recorded"]
    if facts.get("source"):
        lines.append(f"- converted from: {facts['source']}; the original release's license terms apply to the weights")
    if facts.get("command"):
        lines += ["- command:", "", "```bash", facts["command"], "```"]
    if facts.get("recipe"):
        recipe = yaml.safe_dump(_plain(facts["recipe"]), sort_keys=False).strip()
        lines += ["", "<details><summary>Training recipe (resolved config)</summary>", "", "```yaml", recipe, "```",
                  "", "</details>"]
    lines += ["", "## Upload to the Hub", "", "The folder is a complete Hub repo (weights, configs, this card):", "",
              "```bash", f"hf upload your-name/your-repo {folder}", "```", ""]
    return "\n".join(lines)


def _headline(described: dict) -> str:
    kind = described["kind"]
    if kind == "tokenizer":
        return (f"{described['quantizer'].upper()} image tokenizer: {described['codebook_size']:,} codes, "
                f"{described['sample_size']} px -> {described['grid']} x {described['grid']} tokens")
    if kind == "gpt":
        return (f"Class-conditional GPT over {described['codebook_size']:,} image codes "
                f"({described['num_classes']} classes)")
    generator = "GPT" if described["generator"]["kind"] == "gpt" else "DiT"
    tokenizer = described["tokenizer"]
    return (f"Class-conditional image generation: {generator} + {tokenizer['quantizer'].upper()} tokenizer "
            f"({tokenizer['codebook_size']:,} codes, {described['sample_size']} px)")


def _made_by(facts: dict) -> str:
    if facts.get("source"):
        return f"converted from {facts['source']}"
    if facts.get("command"):
        return "trained with the command below"
    return "saved with fullvq's `save_pretrained`"


def _snippet(described: dict, where: str) -> str:
    kind = described["kind"]
    if kind == "pipeline":
        names = [name.split(",")[0] for _, name in sorted(described["id2label"].items(), key=lambda i: int(i[0]))]
        labels = repr(names[:2]) if names else "[0, 1]"
        return "\n".join([
            "```python", "import torch", "from diffusers import DiffusionPipeline", "",
            "# trust_remote_code: this folder's fullvq_classes.py imports the classes from fullvq",
            f"pipe = DiffusionPipeline.from_pretrained({where!r}, trust_remote_code=True)",
            f"images = pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images",
            "images[0].save(\"sample.png\")", "```", "",
            "Or with fullvq's own loader: "
            f"`from fullvq.pipelines import load_pipeline; pipe = load_pipeline({where!r})`."])
    if kind == "tokenizer":
        size = described["sample_size"]
        return "\n".join([
            "```python", "import torch", "from fullvq import FVQModel", "",
            f"tokenizer = FVQModel.from_pretrained({where!r}).eval()",
            f"images = torch.rand(2, 3, {size}, {size}) * 2 - 1  # your images, scaled to [-1, 1]",
            "with torch.no_grad():",
            "    codes = tokenizer.encode_indices(images)  # (B, h, w) code ids",
            "    reconstructions = tokenizer.decode_indices(codes)  # (B, 3, H, W) in [-1, 1]", "```"])
    return "\n".join([
        "```python", "import torch", "from fullvq import FullVQGPT", "from fullvq.generator.sampling import sample", "",
        f"gpt = FullVQGPT.from_pretrained({where!r}).eval()",
        "codes = sample(gpt, torch.tensor([0, 1]), guidance_scale=2.0, generator=torch.Generator().manual_seed(0))",
        "```", "",
        "`codes` holds one row of code ids per class label; the tokenizer the GPT was trained with decodes them "
        "(`FullVQPipeline(tokenizer, gpt)` does both steps)."])


def _architecture(described: dict) -> list[str]:
    kind = described["kind"]
    if kind == "pipeline":
        rows = [("pipeline", described["class"]), ("image size", f"{described['sample_size']} px"),
                ("classes", f"{len(described['id2label']) or 'ids only (no id2label)'}")]
        generator = described["generator"]
        if generator["kind"] == "gpt":
            rows += [("generator", f"FullVQGPT, {_plural(generator['num_hidden_layers'], 'layer')} x "
                                   f"{generator['hidden_size']} wide, {_count(generator['parameters'])} parameters")]
        else:
            rows += [("generator", f"{generator['class']}, {_plural(generator['num_layers'], 'layer')} x "
                                   f"{generator['width']} wide, {_count(generator['parameters'])} parameters; "
                                   f"scheduler {generator['scheduler']}")]
        tokenizer = described["tokenizer"]
        rows += [("tokenizer", f"{tokenizer['quantizer']}, {tokenizer['grid']} x {tokenizer['grid']} tokens, "
                               f"{_count(tokenizer['parameters'])} parameters")]
    elif kind == "tokenizer":
        rows = [("quantizer", described["quantizer"]), ("image size", f"{described['sample_size']} px"),
                ("tokens", f"{described['grid']} x {described['grid']} (downsample {described['downsample_factor']})"),
                ("autoencoder channels", described["block_out_channels"]),
                ("parameters", _count(described["parameters"]))]
    else:
        rows = [("classes", described["num_classes"]), ("token grid", described["grid_size"]),
                ("codebook size", f"{described['codebook_size']:,}"),
                ("layers x width x heads", f"{described['num_hidden_layers']} x {described['hidden_size']} x "
                                           f"{described['num_attention_heads']}"),
                ("parameters", _count(described["parameters"]))]
    return ["| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]


def _codebook(tokenizer: dict, metrics: dict) -> list[str]:
    lines = [f"- {tokenizer['codebook_size']:,} codes of dimension {tokenizer['codebook_dim']}; "
             f"{QUANTIZERS.get(tokenizer['quantizer'], tokenizer['quantizer'])}."]
    if tokenizer["quantizer_kwargs"]:
        lines.append(f"- quantizer settings: {json.dumps(tokenizer['quantizer_kwargs'], sort_keys=True)}")
    usage = [(section, figures["codebook_usage_percent"]) for section, figures in metrics.items()
             if isinstance(figures.get("codebook_usage_percent"), (int, float))]
    if usage:
        lines += [f"- usage ({section}): {value:.2f} % of the codes" for section, value in usage]
    else:
        lines.append("- usage: not measured yet (`fullvq eval rfid` counts it over a whole evaluation set)")
    return lines


def _report_figures(report: dict) -> tuple[str, dict]:
    """An eval report -> (section name, the figures worth a card) for its task."""
    if not report.get("complete"):
        raise ValueError("the eval report is not complete (complete=false); finish the evaluation first")
    task = report.get("task", "evaluation")
    values = {name: value for name, value in (report.get("metrics") or {}).items() if value is not None}
    order = [name for name in HEADLINE.get(task, ()) if name in values]
    figures = {name: values[name] for name in order + sorted(set(values) - set(order))}
    figures.update(data=report.get("data") or report.get("reference"), images=report.get("num_images"),
                   report=(report.get("files") or {}).get("report"))
    return task, {key: value for key, value in figures.items() if value is not None}


def _hub_results(metrics: dict):
    """(task type, dataset, metric type, display name, value) rows of the Hub's model-index."""
    wanted = {"reconstruction": ("image-to-image", {"rfid": ("fid", "rFID"), "psnr": ("psnr", "PSNR")}),
              "generation": ("unconditional-image-generation", {"fid": ("fid", "gFID"),
                                                                   "inception_score": ("is", "IS")})}
    for section, figures in metrics.items():
        task_type, names = wanted.get(section, (None, {}))
        dataset = str(figures.get("data") or "unknown")
        for name, (metric, display) in names.items():
            if isinstance(figures.get(name), (int, float)):
                yield task_type, dataset, metric, display, float(figures[name])


def _tags(described: dict) -> list[str]:
    tokenizer = described.get("tokenizer", described) if described["kind"] == "pipeline" else described
    tags = ["fullvq", "vector-quantization"]
    if tokenizer.get("quantizer"):
        tags.append(f"quantizer-{tokenizer['quantizer']}")
    if described["kind"] == "tokenizer":
        tags += ["image-tokenizer"]
    else:
        tags += ["class-conditional", "image-generation"]
    if described["kind"] == "pipeline":
        tags += ["autoregressive" if described["generator"]["kind"] == "gpt" else "diffusion", "custom_code"]
        if len(described["id2label"]) == 1000:
            tags.append("imagenet")
    return tags


def _parameter_count(folder: Path) -> int | None:
    """Number of weights in the folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="numpy") as weights:
            for key in weights.keys():
                count = 1
                for side in weights.get_slice(key).get_shape():
                    count *= side
                total += count
    return total


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _count(number: int | None) -> str:
    if number is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return str(number)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value):
    """JSON-like data for YAML: tuples as lists, paths and other objects as text."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; the folder is incomplete (re-save it with save_pretrained)") from None


__all__ = ["CARD_NAME", "add_report_to_card", "command_line", "describe_folder", "folder_name", "read_card_facts",
           "usage_figures", "write_model_card"]
