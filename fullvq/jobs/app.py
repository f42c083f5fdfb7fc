"""``fullvq app``: a Gradio page for looking at a pipeline or a tokenizer without writing code.

Generate tab (pipelines): pick classes by name, synonym or id, set the sampling knobs, get a grid to
look at and to download. Tokenize tab (pipelines and tokenizer folders): upload an image, see its
reconstruction, PSNR, the token grid as a colour map of code ids and how often each code occurs.
Bad input (an unknown class, a file that is not an image, a huge image) gets a message in the page.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_SIDE = 4096  # a larger upload is refused (the tokenizer sees a centre crop at its own size anyway)
MAX_IMAGES = 64  # images per generate click
DISPLAY_SIDE = 256  # small images and the token grid are shown scaled up to about this many pixels


def load_models(path: str | os.PathLike, device: str = "cpu"):
    """(pipeline or None, tokenizer) from a pipeline folder (``model_index.json``) or a tokenizer folder."""
    from ..cards import describe_folder

    path = Path(path)
    try:  # a pipeline folder goes to its loader even when a component is damaged: that names the fault
        kind = "pipeline" if (path / "model_index.json").is_file() else describe_folder(path)["kind"]
    except ValueError:
        kind = None
    if kind == "pipeline":
        from ..pipelines import load_pipeline

        pipeline = load_pipeline(path).to(device)
        return pipeline, pipeline.tokenizer.eval()
    if kind == "tokenizer":
        from ..tokenizer.modeling import FVQModel

        return None, FVQModel.from_pretrained(path).to(device).eval()
    raise ValueError(f"{path} is neither a pipeline folder (model_index.json) nor a tokenizer folder"
                     + (" (it holds a GPT alone, which makes no images without its tokenizer)" if kind else "")
                     + "; pass what train-generator / convert / demo wrote (…/pipeline) or a tokenizer's model/ folder")


def class_choices(pipeline) -> list[str]:
    """Dropdown entries ``"id: name"`` for every class (plain ids when the pipeline has no names)."""
    names = pipeline.config.id2label or {}
    return [f"{i}: {names[i]}" if i in names else str(i) for i in range(pipeline.num_classes)]


def parse_classes(pipeline, values) -> list[int]:
    """Class ids for the dropdown's values: listed entries ``"id: name"``, or typed names, synonyms and ids.

    Raises ``ValueError`` (with close matches) for what matches no class.
    """
    if isinstance(values, str):
        values = [values]
    values = [str(value).strip() for value in values or [] if str(value).strip()]
    if not values:
        raise ValueError("pick at least one class (type a name, a synonym or an id)")
    labels = []
    for value in values:
        head, _, _ = value.partition(":")
        labels.append(int(head) if head.strip().isdigit() else value)
    return pipeline.get_label_ids(labels)


def generate(pipeline, classes, images_per_class: int, seed: int, output_dir: Path, **options):
    """Sample ``images_per_class`` images per class; returns (images as PIL, path of the grid PNG: a row per class).

    ``options`` are sampling settings (guidance_scale, temperature, top_k, top_p, num_inference_steps,
    snap_to_codebook); those of the other kind of pipeline are ignored (the page shows both kinds' controls).
    """
    from ..images import from_unit_range, save_image_grid

    ids = parse_classes(pipeline, classes)
    images_per_class = int(images_per_class)
    if not 1 <= len(ids) * images_per_class <= MAX_IMAGES:
        raise ValueError(f"{len(ids)} classes x {images_per_class} images is over the {MAX_IMAGES} images one click "
                         "makes; pick fewer classes or images")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    mine = ("guidance_scale", *pipeline.sampling_settings)
    settings = pipeline.sampling_options(**{name: value for name, value in options.items() if name in mine})
    images = pipeline(class_labels=ids, num_images_per_label=images_per_class, generator=generator, output_type="pt",
                      **settings).images
    rows = list(from_unit_range(images).view(len(ids), images_per_class, *images.shape[1:]))
    grid = save_image_grid(rows, Path(tempfile.mkdtemp(dir=output_dir)) / "fullvq-samples.png")
    return pipeline.numpy_to_pil(images.permute(0, 2, 3, 1).numpy()), grid


def read_upload(path: str | os.PathLike | None) -> Image.Image:
    """The uploaded file as an RGB image; ``ValueError`` for no file, a file that is not an image, or a huge one."""
    from ..data import UnreadableImageError, load_image

    if not path:
        raise ValueError("upload an image first")
    name = Path(path).name
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before any decoding
            width, height = image.size
    except Exception as error:  # PIL raises several types for what it cannot identify
        raise ValueError(f"{name} is not an image PIL can read ({type(error).__name__}); upload a PNG, JPEG or WebP "
                         "file") from None
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"{name} is {width} x {height} px, larger than the app takes ({MAX_SIDE} px a side); "
                         "resize it first")
    try:
        return load_image(path)
    except UnreadableImageError as error:
        raise ValueError(f"{name} could not be decoded: {error}") from None


@torch.no_grad()
def tokenize(tokenizer, image: Image.Image) -> dict:
    """Encode and decode one image at the tokenizer's ``sample_size`` (short side resized, centre crop).

    Returns ``{"original", "reconstruction", "token_map"}`` PIL images, ``"psnr"`` in dB, ``"indices"``
    (h, w) and ``"counts"``, the image's tokens per code id.
    """
    from ..data import eval_transform
    from ..eval.pixel import psnr

    size = int(tokenizer.config.sample_size)
    pixels = eval_transform(size)(image).unsqueeze(0).to(tokenizer.device, tokenizer.dtype)
    indices = tokenizer.encode_indices(pixels)
    reconstruction = tokenizer.decode_indices(indices).clamp(-1, 1)
    indices = indices[0].cpu()
    codebook_size = int(tokenizer.config.codebook_size)
    return {"original": _to_pil(pixels[0]), "reconstruction": _to_pil(reconstruction[0]),
            "psnr": float(psnr(pixels.float(), reconstruction.float())[0]), "indices": indices,
            "token_map": token_map(indices, codebook_size),
            "counts": torch.bincount(indices.flatten(), minlength=codebook_size)}


def token_map(indices: torch.Tensor, codebook_size: int) -> Image.Image:
    """The (h, w) code ids as a colour image (one colour per id along a rainbow map), cells scaled up."""
    import matplotlib

    colours = matplotlib.colormaps["turbo"](indices.numpy() / max(codebook_size - 1, 1))[..., :3]
    return enlarge(Image.fromarray((colours * 255).round().astype(np.uint8)))


def enlarge(image: Image.Image) -> Image.Image:
    """``image`` scaled up by a whole factor (pixels kept sharp) to about ``DISPLAY_SIDE``; large ones as they are."""
    scale = max(1, DISPLAY_SIDE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def frequency_plot(counts: torch.Tensor):
    """Bar chart of how many of the image's tokens each code id took (codes that occur only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = torch.nonzero(counts).flatten()
    figure, axis = plt.subplots(figsize=(6, 2.6), dpi=100)
    axis.bar(used.numpy(), counts[used].numpy(), width=max(1.0, len(counts) / 400), color="tab:blue")
    axis.set_xlim(-0.5, len(counts) - 0.5)
    axis.set_xlabel("code id")
    axis.set_ylabel("tokens")
    axis.set_title(f"{len(used)} distinct codes of {len(counts):,} in {int(counts.sum())} tokens", fontsize=9)
    figure.tight_layout()
    plt.close(figure)
    return figure


def _to_pil(image: torch.Tensor) -> Image.Image:
    from ..images import to_uint8

    return Image.fromarray(to_uint8(image).cpu().permute(1, 2, 0).numpy())


def build_app(pipeline=None, tokenizer=None, title: str = "fullvq"):
    """The Gradio page (``gr.Blocks``): a Generate tab when ``pipeline`` is given, and a Tokenize tab."""
    import gradio as gr

    tokenizer = tokenizer if tokenizer is not None else pipeline.tokenizer
    output_dir = Path(tempfile.mkdtemp(prefix="fullvq-app-"))
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}")
        if pipeline is not None:
            _generate_tab(gr, pipeline, output_dir)
        _tokenize_tab(gr, tokenizer)
    return app


def _generate_tab(gr, pipeline, output_dir: Path) -> None:
    from ..pipelines import LatentFlowPipeline

    flow = isinstance(pipeline, LatentFlowPipeline)
    with gr.Tab("Generate"):
        classes = gr.Dropdown(class_choices(pipeline), multiselect=True, allow_custom_value=True, label="Classes",
                              info="type to search names and synonyms, or an id; Enter adds it")
        with gr.Row():
            count = gr.Slider(1, 16, value=4, step=1, label="Images per class", elem_id="per-class")
            seed = gr.Number(0, precision=0, label="Seed")
            guidance = gr.Slider(1.0, 10.0, value=pipeline.sampling_options()["guidance_scale"], step=0.25,
                                 label="Guidance scale")
        with gr.Row(visible=not flow):
            temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature")
            top_k = gr.Slider(0, int(pipeline.tokenizer.config.codebook_size), value=0, step=1, label="Top-k (0 = off)")
            top_p = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Top-p (1 = off)")
        with gr.Row(visible=flow):
            steps = gr.Slider(1, 250, value=50, step=1, label="Steps")
            snap = gr.Checkbox(False, label="Snap to codebook")
        button = gr.Button("Generate", variant="primary")
        message = gr.Markdown(elem_id="generate-message")
        gallery = gr.Gallery(label="Samples", columns=8, elem_id="samples")
        download = gr.File(label="Grid (PNG, a row per class)", elem_id="grid")

        def run(values, images_per_class, seed_value, guidance_scale, temperature_value, top_k_value, top_p_value,
                steps_value, snap_value, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's way)
            try:
                images, grid = generate(pipeline, values, images_per_class, seed_value or 0, output_dir,
                                        guidance_scale=guidance_scale, temperature=temperature_value,
                                        top_k=int(top_k_value), top_p=top_p_value,
                                        num_inference_steps=int(steps_value), snap_to_codebook=bool(snap_value))
            except (ValueError, TypeError) as error:
                return gr.update(), gr.update(), f"**Cannot generate:** {error}"
            return images, str(grid), f"{len(images)} images"

        button.click(run, [classes, count, seed, guidance, temperature, top_k, top_p, steps, snap],
                     [gallery, download, message])


def _tokenize_tab(gr, tokenizer) -> None:
    with gr.Tab("Tokenize"):
        upload = gr.File(label="Image", type="filepath", elem_id="upload")
        button = gr.Button("Tokenize", variant="primary")
        message = gr.Markdown(elem_id="tokenize-message")
        with gr.Row():
            original = gr.Image(label="Input (as the tokenizer sees it)", elem_id="original", height=320)
            reconstruction = gr.Image(label="Reconstruction", elem_id="reconstruction", height=320)
            tokens = gr.Image(label="Token grid (colour = code id)", elem_id="token-map", height=320)
        frequency = gr.Plot(label="Code frequency in this image")

        def run(path):
            try:
                result = tokenize(tokenizer, read_upload(path))
            except ValueError as error:
                return None, None, None, None, f"**Cannot tokenize:** {error}"
            height, width = result["indices"].shape
            text = (f"PSNR {result['psnr']:.2f} dB; {height} x {width} tokens, "
                    f"{int((result['counts'] > 0).sum())} distinct codes")
            return (enlarge(result["original"]), enlarge(result["reconstruction"]), result["token_map"],
                    frequency_plot(result["counts"]), text)

        button.click(run, [upload], [original, reconstruction, tokens, frequency, message])


def launch(path: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None, device: str = "cpu",
           share: bool = False, block: bool = True):
    """Load ``path`` (a pipeline or tokenizer folder) and serve the page; returns the running ``gr.Blocks``."""
    from ..cards import folder_name

    pipeline, tokenizer = load_models(path, device)
    if pipeline is not None:
        pipeline.set_progress_bar_config(disable=False)
    app = build_app(pipeline, tokenizer, title=f"fullvq: {folder_name(path)}")
    serve(app, host=host, port=port, share=share, block=block)
    return app


def serve(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True) -> None:
    """Start ``app``'s server; with ``block=False`` return once it answers (stop it with ``app.close()``)."""
    import gradio as gr

    # System fonts: the default theme's web fonts would be fetched from the internet by every browser.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    # Quiet: Gradio's own banner tells a command-line user to set `share=True` in `launch()`.
    app.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                       max_file_size="50mb", quiet=True, theme=theme)
    if block:
        public = f" and {app.share_url}" if app.share_url else " (--share adds a public Gradio link)"
        print(f"fullvq app: serving {app.local_url}{public}; Ctrl+C stops it", flush=True)
        app.block_thread()
