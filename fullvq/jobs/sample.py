"""The ``sample`` job: images from a pipeline folder, one PNG each plus a grid (``fullvq sample``).

Either pipeline: a ``FullVQPipeline`` (GPT: ``temperature``, ``top_k``, ``top_p``,
``guidance_schedule``) or a ``LatentFlowPipeline`` (DiT / flow: ``num_inference_steps``,
``snap_to_codebook``); settings of the other kind are refused before any sampling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..images import from_unit_range, save_image_grid
from ..io import atomic_file, make_output_folder
from ..pipelines import load_pipeline
from ..precision import inference_dtype


def sample_to_folder(
    pipeline: str | os.PathLike,
    labels: list[int | str],
    output: str | os.PathLike,
    *,
    num_images_per_label: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    **options,
) -> list[Path]:
    """Sample ``num_images_per_label`` images for each label (ids or class names) from the pipeline
    folder or hub id ``pipeline``; writes ``{class id}_{i}.png`` and ``grid.png`` (a row per label)
    into ``output`` and returns the image paths. ``options`` are sampling settings (``guidance_scale``
    and the pipeline kind's own, see ``sampling_options``); None or absent ones take the pipeline's
    defaults, those of the other kind of pipeline are refused before sampling. ``dtype``: the
    pipeline's weights (default bfloat16 on CUDA, float32 elsewhere; the samplers keep logits,
    guidance and latents in float32)."""
    from torchvision.utils import save_image

    output = make_output_folder(output)  # before the work: an output that is a file fails now, not after it
    pipe = load_pipeline(pipeline, dtype=inference_dtype(device, dtype)).to(device)
    options = pipe.sampling_options(**options)
    ids = pipe.get_label_ids(labels)
    images = pipe(ids, num_images_per_label=num_images_per_label, **options,
                  generator=torch.Generator().manual_seed(seed), batch_size=batch_size, output_type="pt").images

    written: dict[int, int] = {}  # class id -> images written, so a repeated label does not overwrite
    paths = []
    for label, image in zip((i for i in ids for _ in range(num_images_per_label)), images, strict=True):
        index = written.get(label, 0)
        paths.append(output / f"{label}_{index}.png")
        with atomic_file(paths[-1]) as staging:
            save_image(image, staging)
        written[label] = index + 1
    save_image_grid(list(from_unit_range(images).split(num_images_per_label)), output / "grid.png")
    return paths


__all__ = ["sample_to_folder"]
