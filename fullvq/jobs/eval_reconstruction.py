"""The rFID job (``fullvq eval rfid``): a tokenizer's reconstructions of an evaluation set.

Every image is centre-cropped at the tokenizer's resolution, encoded, quantized and decoded. The
report holds rFID (originals vs reconstructions, InceptionV3 pool3), PSNR, SSIM, LPIPS and codebook
usage / perplexity / dead codes counted over every token of the whole set. Beside ``report.json``:
``reconstructions.png`` (rows: worst originals, their reconstructions, best originals, theirs, by
PSNR) and ``code_histogram.png`` (code frequencies, sorted).

Under ``accelerate launch`` each process reconstructs every ``num_processes``-th image; per-image
figures, features and code counts are gathered once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..cards import add_report_to_card
from ..data import ReadableSubset, build_dataset
from ..distributed import gather_in_order, loader_options, process_state
from ..eval.features import InceptionExtractor
from ..eval.pixel import psnr, ssim
from ..eval.reference import ReferenceStatistics
from ..eval.report import name_of, running_report, write_report
from ..eval.scores import frechet_distance
from ..images import from_uint8, save_image_grid, save_usage_histogram, to_uint8
from ..io import local_folder_or_hub_id
from ..tokenizer.losses import PerceptualLoss
from ..tokenizer.modeling import FVQModel
from ..tokenizer.quantizers import CodebookUsage

REPORT_NAME = "report.json"
GRID_NAME = "reconstructions.png"
HISTOGRAM_NAME = "code_histogram.png"


def _build_lpips(lpips, lpips_weights, device):
    """A PerceptualLoss, or None when LPIPS is off. Missing VGG weights fail here, before any work."""
    if lpips is False or lpips is None:
        return None
    if lpips is True:
        return PerceptualLoss(vgg_weights=lpips_weights).to(device)
    return lpips.to(device)  # a ready module (tests pass a random-backbone PerceptualLoss)


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer,
    data,
    output_dir: str | os.PathLike,
    *,
    split: str = "train",
    num_images: int | None = None,
    batch_size: int = 32,
    inception_weights: str | os.PathLike | None = None,
    inception_batch_size: int = 50,
    lpips: bool | torch.nn.Module = True,
    lpips_weights: str | os.PathLike | None = None,
    num_grid: int = 8,
    num_workers: int | None = None,
) -> dict:
    """Reconstruct an evaluation set and write the report, the grid and the histogram.

    Args:
        tokenizer: an ``FVQModel`` or the folder it was saved to.
        data: a ``build_dataset`` source (image folder, ``demo``, hub name, ...) or a dataset whose
            items are ``{"pixel_values": (3, R, R) in [-1, 1]}``, R the tokenizer's ``sample_size``.
        output_dir: where ``report.json`` and the PNGs go.
        split, num_images: dataset split; evaluate only its first ``num_images`` images.
        inception_weights: local InceptionV3 weights (see ``fullvq.eval.inception``).
        lpips: True = LPIPS(VGG) with ``lpips_weights`` (or the usual lookup), False = skip,
            or a ready ``PerceptualLoss``.
        num_grid: worst and best reconstructions shown in the grid.

    Returns:
        The report (also in ``output_dir/report.json``); its ``"complete"`` is True only when every
        image was evaluated. A failed run leaves a report with ``"complete": false`` and the error.
    """
    state, started = process_state(), time.time()
    output_dir = Path(output_dir)
    report_path = output_dir / REPORT_NAME
    evaluated = tokenizer  # a local folder's model card gets the figures at the end
    with running_report(report_path, "reconstruction", state.is_main_process, tokenizer=name_of(tokenizer),
                        data=name_of(data), split=split) as report:
        # Everything that can be missing (the folder, weights, data) is resolved before any image is processed.
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = local_folder_or_hub_id(tokenizer, "tokenizer")
        extractor = InceptionExtractor(inception_weights, state.device)
        perceptual = _build_lpips(lpips, lpips_weights, state.device)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = FVQModel.from_pretrained(tokenizer)
        tokenizer = tokenizer.to(state.device).eval()
        resolution = int(tokenizer.config.sample_size)
        dataset = (build_dataset(data, resolution=resolution, train=False, split=split)
                   if isinstance(data, (str, os.PathLike)) else data)
        total = len(dataset) if num_images is None else min(int(num_images), len(dataset))
        if total < 2:
            raise ValueError(f"the evaluation set has {total} image(s); rFID needs at least 2")
        report.update(resolution=resolution, num_images=total, num_processes=state.num_processes,
                      inception_weights=extractor.weights_info)

        gathered, usage = _reconstruct(tokenizer, dataset, total, extractor, perceptual, batch_size=batch_size,
                                       inception_batch_size=inception_batch_size, num_workers=num_workers)
        skipped = _unreadable(gathered["index"], total)
        if not state.is_main_process:
            return report
        unavailable = {}
        if perceptual is None:
            unavailable["lpips"] = "skipped (--no-lpips)"
        elif lpips is not True:
            report["lpips_note"] = "LPIPS from a caller-supplied module"
        grid_path = _save_worst_best(tokenizer, dataset, gathered, num_grid, output_dir / GRID_NAME, state.device)
        histogram_path = save_usage_histogram(usage, output_dir / HISTOGRAM_NAME)
        report.update(
            complete=True, status="done", metrics=_metrics(gathered, usage), unavailable=unavailable,
            num_images=total - len(skipped), skipped_unreadable_files=len(skipped),
            skipped_files=[_source_name(dataset, i) for i in skipped[:100]], seconds=round(time.time() - started, 2),
            files={"report": str(report_path), "grid": str(grid_path), "histogram": str(histogram_path)},
        )
        write_report(report_path, report)
        add_report_to_card(evaluated, report)
        return report


def _reconstruct(tokenizer, dataset, total: int, extractor: InceptionExtractor, perceptual, *, batch_size: int,
                 inception_batch_size: int, num_workers: int | None
                 ) -> tuple[dict[str, torch.Tensor | None], CodebookUsage]:
    """This process's share of the first ``total`` images reconstructed and measured; returns the
    per-image figures and Inception features of the readable images (gathered in set order, their
    positions under ``"index"``) and the code counts (summed over processes). An unreadable image is
    left out, never replaced by another (which would count that one twice)."""
    state = process_state()
    mine = list(range(state.process_index, total, state.num_processes))
    loader = DataLoader(ReadableSubset(dataset, mine), batch_size=batch_size, collate_fn=_collate_readable,
                        **loader_options(num_workers, state.device))
    usage = CodebookUsage(tokenizer.config.codebook_size, device=state.device)
    per_image = {"index": [], "psnr": [], "ssim": [], "lpips": [], "real": [], "fake": []}
    bar = tqdm(total=len(mine), desc="reconstruct", unit="img", disable=not state.is_main_process)
    for batch in loader:
        bar.update(batch["requested"])
        if batch["index"] is None:
            continue
        per_image["index"].append(batch["index"])
        images = batch["pixel_values"].to(state.device)
        out = tokenizer(images)
        usage.update(out.indices)
        # Figures are taken on the uint8 images a PNG would hold, as Inception sees them.
        real_u8, fake_u8 = to_uint8(images), to_uint8(out.sample)
        real, fake = from_uint8(real_u8), from_uint8(fake_u8)
        per_image["psnr"].append(psnr(real, fake).cpu())
        per_image["ssim"].append(ssim(real, fake).cpu())
        if perceptual is not None:
            per_image["lpips"].append(perceptual(real, fake).float().cpu())
        for start in range(0, len(real_u8), inception_batch_size):
            chunk = slice(start, start + inception_batch_size)
            pool, _ = extractor(torch.cat([real_u8[chunk], fake_u8[chunk]]))
            per_image["real"].append(pool[: len(pool) // 2])
            per_image["fake"].append(pool[len(pool) // 2:])
    bar.close()
    names = list(per_image)
    local = [torch.cat(per_image[name]) if per_image[name] else None for name in names]
    kept = local[0].tolist() if local[0] is not None else []
    skipped = sorted(set(mine) - set(kept))
    gathered = dict(zip(names, gather_in_order(kept, local, total, skipped=skipped), strict=True))
    if gathered["index"] is None:
        gathered["index"] = torch.zeros(0, dtype=torch.long)
    return gathered, usage.all_reduce()


def _collate_readable(items) -> dict:
    """``ReadableSubset`` items -> the readable ones' pixels and positions, and how many were asked for."""
    readable = [item for item in items if item is not None]
    return {"requested": len(items),
            "index": torch.tensor([index for _, index in readable], dtype=torch.long) if readable else None,
            "pixel_values": torch.stack([item["pixel_values"] for item, _ in readable]) if readable else None}


def _unreadable(read: torch.Tensor, total: int) -> list[int]:
    """Positions in ``[0, total)`` missing from ``read``; a ValueError when fewer than 2 were read."""
    kept = set(read.tolist())
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} of the {total} images could be read; rFID needs at least 2")
    return [i for i in range(total) if i not in kept]


def _source_name(dataset, index: int) -> str:
    """The file an evaluation item came from, for the report (its position when the set has no files)."""
    return dataset.source_name(index) if hasattr(dataset, "source_name") else f"item {index}"


def _metrics(gathered: dict[str, torch.Tensor | None], usage: CodebookUsage) -> dict:
    """The report's figures: rFID, mean PSNR / SSIM / LPIPS and codebook usage over every token."""
    rfid = frechet_distance(ReferenceStatistics.from_features(gathered["real"]),
                            ReferenceStatistics.from_features(gathered["fake"]))
    return {
        "rfid": rfid,
        "psnr": float(gathered["psnr"].double().mean()),
        "ssim": float(gathered["ssim"].double().mean()),
        "lpips": None if gathered["lpips"] is None else float(gathered["lpips"].double().mean()),
        "codebook_usage_percent": 100 * usage.usage,
        "perplexity": usage.perplexity,
        "dead_codes": usage.dead_codes,
        "used_codes": usage.used_codes,
        "codebook_size": usage.codebook_size,
        "tokens": usage.total,
    }


def _save_worst_best(tokenizer, dataset, gathered: dict[str, torch.Tensor], num_grid: int, path: Path, device) -> Path:
    """Grid rows: the ``num_grid`` worst originals and reconstructions by PSNR, then the best."""
    psnr_values, positions = gathered["psnr"], gathered["index"]
    count = max(1, min(num_grid, len(psnr_values) // 2))
    order = psnr_values.argsort()
    rows = []
    for indices in (order[:count], order[-count:].flip(0)):
        images = torch.stack([dataset[int(positions[i])]["pixel_values"] for i in indices]).to(device)
        rows += [images, tokenizer(images).sample.clamp(-1, 1)]
    save_image_grid(rows, path)
    return path


__all__ = ["evaluate_reconstruction"]
