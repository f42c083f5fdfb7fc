"""Float32 precision switches: TF32 where speed pays, strict IEEE float32 where exactness does.

On Ampere and later GPUs a float32 matrix product or convolution may run in TF32 (10-bit mantissa).
That is the right trade for the autoencoder's and the GPT's matmuls, and wrong for the exact
nearest-code search (near-tie argmins flip) and for Inception features (FID drifts from CPU runs).
``ieee_float32()`` pins strict float32 inside a block whatever the user set globally (and restores
it after); ``allow_tf32()`` is the global speed switch a training run turns on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _precision_settings(convolutions: bool) -> list:
    """The backend objects whose ``fp32_precision`` decides float32 matmuls (and convolutions)."""
    backends = torch.backends
    found = [backends.cuda.matmul]
    mkldnn_matmul = getattr(backends.mkldnn, "matmul", None)  # CPU oneDNN matmuls follow the same setting
    if mkldnn_matmul is not None:
        found.append(mkldnn_matmul)
    if convolutions:
        found.append(backends.cudnn.conv)
        mkldnn_conv = getattr(backends.mkldnn, "conv", None)
        if mkldnn_conv is not None:
            found.append(mkldnn_conv)
    return [setting for setting in found if hasattr(setting, "fp32_precision")]


@contextlib.contextmanager
def ieee_float32(convolutions: bool = False) -> Iterator[None]:
    """Run float32 matmuls (and convolutions when ``convolutions``) in strict IEEE float32 inside the
    block, whatever ``torch.set_float32_matmul_precision`` / ``allow_tf32`` say; restores them after."""
    settings = _precision_settings(convolutions)
    if not settings:  # torch before the fp32_precision API: the legacy flags
        with _legacy_ieee_float32(convolutions):
            yield
        return
    saved = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
        yield
    finally:
        for setting, value in zip(settings, saved, strict=True):
            setting.fp32_precision = value


@contextlib.contextmanager
def _legacy_ieee_float32(convolutions: bool) -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = False
        if convolutions:
            cudnn.allow_tf32 = False
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def allow_tf32(enabled: bool = True) -> None:
    """Let CUDA float32 matmuls and cuDNN convolutions use TF32 (``enabled=False``: strict IEEE).

    Blocks under :func:`ieee_float32` (the nearest-code search, Inception) stay exact either way.
    """
    value = "tf32" if enabled else "ieee"
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        backends.cuda.matmul.fp32_precision = value
        backends.cudnn.conv.fp32_precision = value
    else:
        backends.cuda.matmul.allow_tf32 = enabled
        backends.cudnn.allow_tf32 = enabled


def inference_dtype(device: torch.device | str, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype to load a pipeline in for sampling: ``dtype`` when given, else bfloat16 on CUDA (the
    samplers keep logits, guidance and latents in float32 themselves) and float32 elsewhere."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


__all__ = ["allow_tf32", "ieee_float32", "inference_dtype"]
