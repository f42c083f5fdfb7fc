"""The gFID job (``fullvq eval gfid``): a pipeline's class-balanced samples against a reference set.

``images_per_class`` images are generated for each class, in fixed batches with one seed per batch
(``seed + batch index``), so a run's images do not depend on how many processes made them or on
interruptions. Samples are PNGs in ``output_dir/samples`` (``class{c:05d}_{i:05d}.png``); a rerun
keeps every sample already written, counts it, and only makes the missing ones. ``generation.json``
beside them records the sampling settings, and a rerun with other settings is refused rather than
mixing two sets.

The report (``report.json``) holds gFID, IS, KID, precision and recall against the reference (see
``fullvq.eval.reference.load_reference``), with the reason for any metric that cannot be computed;
``samples.png`` shows the first samples of up to 8 classes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cards import add_report_to_card
from ..distributed import my_share, process_state
from ..eval.features import InceptionExtractor, extract_features
from ..eval.image_sets import ImageFiles
from ..eval.reference import ReferenceStatistics, load_reference, reference_kind
from ..eval.report import name_of, running_report, write_report
from ..eval.scores import check_set_sizes, generation_metrics, warn_if_other_weights
from ..images import from_uint8, save_image_grid, save_png
from ..io import local_folder_or_hub_id, write_text
from ..pipelines import load_pipeline
from ..precision import inference_dtype

REPORT_NAME = "report.json"
SAMPLES_DIR = "samples"
SETTINGS_NAME = "generation.json"
GRID_NAME = "samples.png"


def sample_path(folder: Path, class_id: int, index: int) -> Path:
    return folder / f"class{class_id:05d}_{index:05d}.png"


def _check_settings(folder: Path, settings: dict) -> None:
    """Record the sampling settings beside the samples; refuse to add to samples made otherwise. A
    setting the file does not hold (written by an older fullvq) counts as unchanged."""
    path = folder / SETTINGS_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {key: (previous[key], value) for key, value in settings.items()
                   if key in previous and previous[key] != value}
        if changed:
            listing = ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in changed.items())
            raise ValueError(
                f"the samples in {folder} were generated with {listing}; pass another --output, or delete "
                f"{folder} to start over"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(settings, indent=2) + "\n")


@torch.no_grad()
def generate_samples(
    pipeline,
    folder: str | os.PathLike,
    *,
    classes: list[int],
    images_per_class: int,
    batch_size: int = 32,
    seed: int = 0,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_inference_steps: int | None = None,
    snap_to_codebook: bool | None = None,
) -> tuple[list[Path], int]:
    """Write the class-balanced sample set (resumable); returns every planned path and how many
    were already there. Every process writes its share of the unfinished batches (each seeded by its
number, so which process draws it does not matter).
    Sampling settings left None take the pipeline's defaults (``pipeline.sampling_options``);
    settings of the other kind of pipeline are refused."""
    state = process_state()
    options = pipeline.sampling_options(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                        top_p=top_p, num_inference_steps=num_inference_steps,
                                        snap_to_codebook=snap_to_codebook)
    pipeline.set_progress_bar_config(disable=True)  # one bar over batches instead of one per call
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(class_id, index) for class_id in classes for index in range(images_per_class)]
    paths = [sample_path(folder, class_id, index) for class_id, index in plan]
    existing = sum(path.is_file() for path in paths)
    batches = [list(range(start, min(start + batch_size, len(plan)))) for start in range(0, len(plan), batch_size)]
    # The unfinished batches, read by every process before any writes, then split: a resumed run stays
    # balanced (a rank with nothing left would wait for the others in the barrier below).
    unfinished = [b for b in range(len(batches)) if not all(paths[i].is_file() for i in batches[b])]
    state.wait_for_everyone()
    todo = my_share(unfinished, state.process_index, state.num_processes)
    bar = tqdm(total=len(todo), desc="generate", unit="batch", disable=not state.is_main_process)
    for b in todo:
        members = batches[b]
        output = pipeline(
            class_labels=[plan[i][0] for i in members],
            num_images_per_label=1,
            **options,
            generator=torch.Generator().manual_seed(seed + b),
            batch_size=len(members),
            output_type="pt",
        )
        images = (output.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, image in zip(members, images, strict=True):
            if not paths[i].is_file():  # keep what is there
                save_png(image, paths[i])
        bar.update(1)
    bar.close()
    state.wait_for_everyone()
    return paths, existing


def _save_sample_grid(paths: list[Path], classes: list[int], images_per_class: int, path: Path) -> Path:
    shown = min(images_per_class, 8)
    rows = []
    for row in range(min(len(classes), 8)):
        images = ImageFiles(paths[row * images_per_class: row * images_per_class + shown])
        rows.append(from_uint8(torch.stack([images[i] for i in range(len(images))])))
    save_image_grid(rows, path)
    return path


# Over 80 lines only through its 26-parameter signature and docstring; the body is named steps.
@torch.no_grad()
def evaluate_generation(
    pipeline,
    reference,
    output_dir: str | os.PathLike,
    *,
    images_per_class: int = 50,
    classes: list[int] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_inference_steps: int | None = None,
    snap_to_codebook: bool | None = None,
    reference_split: str = "train",
    reference_resolution: int | None = None,
    reference_limit: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    inception_batch_size: int = 50,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    num_workers: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Generate a class-balanced set, then write the gFID report.

    Args:
        pipeline: a ``FullVQPipeline`` / ``LatentFlowPipeline`` or its folder (``load_pipeline``).
        reference: image folder, ``build_dataset`` source, or ``.npz`` statistics (see ``load_reference``).
        output_dir: report, ``samples/`` and ``samples.png``.
        images_per_class, classes: N images for each class id (default: every class of the GPT).
        batch_size, seed, guidance_scale: sampling; recorded with the samples, as are the settings of
            the pipeline's kind: temperature, top_k, top_p (GPT) or num_inference_steps,
            snap_to_codebook (DiT / flow). None takes the pipeline's default (guidance 2.0 for a GPT,
            ``DEFAULT_GUIDANCE_SCALE``; 4.0 for a DiT).
        reference_split, reference_resolution, reference_limit: how the reference images are read
            (datasets are centre-cropped to ``reference_resolution``, default the pipeline's size).
        inception_weights, cache_dir, use_cache: Inception weights file and the statistics cache.
        kid_subset_size, kid_subsets, prc_neighborhood, isc_splits: metric settings (torch-fidelity's).
        num_workers: decoding workers for the reference and the samples (default: 8 on a GPU, 0 on the CPU).
        dtype: a pipeline folder's weights (default: bfloat16 on a GPU, float32 on the CPU).

    Returns:
        The report; ``"complete"`` is True only when every planned sample exists and was evaluated.
    """
    state, started = process_state(), time.time()
    output_dir = Path(output_dir)
    report_path = output_dir / REPORT_NAME
    evaluated = pipeline  # a local folder's model card gets the figures at the end
    metric_settings = {"kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets,
                       "prc_neighborhood": prc_neighborhood, "isc_splits": isc_splits}
    with running_report(report_path, "generation", state.is_main_process, pipeline=name_of(pipeline),
                        reference=str(reference)) as report:
        if images_per_class < 1:
            raise ValueError(f"images_per_class={images_per_class} must be at least 1")
        if isinstance(pipeline, (str, os.PathLike)):
            pipeline = local_folder_or_hub_id(pipeline, "pipeline")
        extractor = InceptionExtractor(inception_weights, state.device)
        pipeline, classes = _load_pipeline(pipeline, classes, state.device, dtype)
        total = len(classes) * images_per_class
        check_set_sizes(total, None, kid_subset_size=kid_subset_size, prc_neighborhood=prc_neighborhood)
        if extractor.has_logits and total < isc_splits:
            raise ValueError(f"IS with isc_splits={isc_splits} needs at least {isc_splits} images, got {total}")
        resolution = int(pipeline.config.sample_size)
        reference_stats = _reference_for(
            reference, extractor, total, metric_settings, resolution=reference_resolution, sample_size=resolution,
            split=reference_split, limit=reference_limit, cache_dir=cache_dir, use_cache=use_cache,
            batch_size=inception_batch_size, num_workers=num_workers)

        samples = output_dir / SAMPLES_DIR
        # Seeds go by batch, so the plan (classes, N, batch size) must match too for resumed samples to be
        # the ones this run would have drawn.
        sampling = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                        num_inference_steps=num_inference_steps, snap_to_codebook=snap_to_codebook)
        settings = {"classes": classes, "images_per_class": images_per_class, "batch_size": batch_size, "seed": seed,
                    **pipeline.sampling_options(**sampling)}
        if state.is_main_process:
            _check_settings(samples, settings)
        state.wait_for_everyone()
        paths, kept = generate_samples(pipeline, samples, classes=classes, images_per_class=images_per_class,
                                       batch_size=batch_size, seed=seed, **sampling)
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(paths)} samples were not written (first: {missing[0]})")

        features, logits = extract_features(ImageFiles(paths, expected_size=(resolution, resolution)), extractor,
                                            batch_size=inception_batch_size, num_workers=num_workers,
                                            desc="generated")
        if not state.is_main_process:
            return report
        metrics, unavailable = generation_metrics(features, logits, reference_stats, **metric_settings)
        note = warn_if_other_weights(reference_stats, extractor.weights_info)
        grid_path = _save_sample_grid(paths, classes, images_per_class, output_dir / GRID_NAME)
        report.update(
            complete=True, status="done", metrics=metrics, unavailable=unavailable,
            num_images=total, num_classes=len(classes), images_per_class=images_per_class,
            samples_kept=kept, samples_generated=total - kept, resolution=resolution, sampling=settings,
            reference_info={**reference_stats.info, "num_images": reference_stats.num_images},
            inception_weights=extractor.weights_info, num_processes=state.num_processes,
            settings=metric_settings, seconds=round(time.time() - started, 2),
            files={"report": str(report_path), "samples": str(samples), "grid": str(grid_path)},
        )
        if note:
            report["note"] = note
        write_report(report_path, report)
        add_report_to_card(evaluated, report)
        return report


def _load_pipeline(pipeline, classes: list[int] | None, device, dtype: torch.dtype | None = None) -> tuple:
    """The pipeline (loaded from its folder when given one, in ``inference_dtype``) on ``device``, and the
    checked class ids (default: all of them)."""
    if isinstance(pipeline, (str, os.PathLike)):
        pipeline = load_pipeline(pipeline, dtype=inference_dtype(device, dtype))
    pipeline = pipeline.to(device)
    num_classes = int(pipeline.num_classes)
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"classes {bad or classes} are not ids in [0, {num_classes}) of this pipeline")
    return pipeline, classes


def _reference_for(reference, extractor: InceptionExtractor, total: int, metric_settings: dict, *,
                   resolution: int | None, sample_size: int, split: str, limit: int | None, cache_dir,
                   use_cache: bool, batch_size: int, num_workers: int | None) -> ReferenceStatistics:
    """The reference statistics, first: their errors (and their cost, once) come before hours of
    sampling. Datasets are centre-cropped to ``resolution``, by default the samples' ``sample_size``;
    folders and .npz are taken as they are unless a resolution is given."""
    if resolution is None and reference_kind(reference) == "dataset":
        resolution = sample_size
    stats = load_reference(reference, extractor, resolution=resolution, split=split, limit=limit,
                           cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size, num_workers=num_workers)
    count = None if stats.features is None else len(stats.features)
    check_set_sizes(total, count, kid_subset_size=metric_settings["kid_subset_size"] if count else None,
                    prc_neighborhood=metric_settings["prc_neighborhood"] if count else None)
    return stats


def save_reference_statistics(reference, output: str | os.PathLike, *, resolution: int | None = None,
                              split: str = "train", limit: int | None = None,
                              inception_weights: str | os.PathLike | None = None, batch_size: int = 50,
                              num_workers: int | None = None) -> ReferenceStatistics:
    """Inception statistics (and features) of a reference set, written as a ``.npz`` to ``output``
    (``fullvq eval reference-stats``: use the file as gfid's reference). Returns them on every process."""
    extractor = InceptionExtractor(inception_weights)
    stats = load_reference(reference, extractor, resolution=resolution, split=split, limit=limit, use_cache=False,
                           batch_size=batch_size, num_workers=num_workers)
    if process_state().is_main_process:
        stats.info.update(inception_weights=extractor.weights_info)
        stats.save(output)
    return stats


__all__ = ["evaluate_generation", "generate_samples", "sample_path", "save_reference_statistics"]
