"""Images in and out: the value ranges, PNG grids, single PNGs and the code-usage histogram.

Models work on float images in [-1, 1]; pipelines hand out [0, 1]; files and Inception hold
uint8 in [0, 255]. The conversions between the three live here once, as do the pictures every
job writes (written atomically, see ``fullvq.io``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import atomic_file


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> [0, 1] (clamped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (a pipeline's ``output_type="pt"``) -> [-1, 1]."""
    return images.float() * 2 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> uint8 in [0, 255], rounded (what a PNG would hold)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], with exactly the arithmetic of fullvq.data's float
    transforms (``ToDtype(scale=True)``, then ``Normalize(0.5, 0.5)``): a uint8 data path normalised on
    the device gives bit for bit the inputs of the float one."""
    return images.float().mul_(1.0 / 255).sub_(0.5).div_(0.5)


def save_image_grid(rows: list[torch.Tensor], path: str | os.PathLike) -> Path:
    """Write rows of images in [-1, 1] ((N, 3, H, W) each, N alike) as one PNG grid, 2 px apart."""
    from torchvision.utils import save_image

    grid = torch.cat([r.detach().float().cpu().clamp(-1, 1) for r in rows])
    with atomic_file(path) as staging:
        save_image((grid + 1) / 2, staging, nrow=rows[0].shape[0], padding=2)
    return Path(path)


def save_png(array, path: str | os.PathLike) -> Path:
    """Write one (H, W, 3) uint8 array as a PNG."""
    from PIL import Image

    with atomic_file(path) as staging:
        Image.fromarray(array).save(staging, format="PNG")
    return Path(path)


def save_usage_histogram(usage, path: str | os.PathLike, step: int | None = None) -> Path:
    """PNG of a ``CodebookUsage``'s code counts sorted from most to least used (log scale, so the
    dead tail shows), titled with usage, perplexity and dead codes (and ``step`` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = usage.counts.detach().cpu().sort(descending=True).values.double().numpy()
    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=100)
    # One filled step curve: a bar per code is one matplotlib patch per code (31 s at K = 16,384).
    axis.stairs(counts, fill=True, color="tab:blue")
    axis.set_yscale("symlog", linthresh=1)
    axis.set_xlim(0, len(counts))
    axis.set_xlabel("code rank (most to least used)")
    axis.set_ylabel("tokens")
    title = (f"usage {100 * usage.usage:.2f} % of {usage.codebook_size}, perplexity {usage.perplexity:.1f}, "
             f"dead codes {usage.dead_codes}")
    axis.set_title(title + (f" (step {step})" if step is not None else ""), fontsize=9)
    figure.tight_layout()
    with atomic_file(path) as staging:
        figure.savefig(staging, format="png")
    plt.close(figure)
    return Path(path)


__all__ = [
    "to_unit_range",
    "from_unit_range",
    "to_uint8",
    "from_uint8",
    "save_image_grid",
    "save_png",
    "save_usage_histogram",
]
