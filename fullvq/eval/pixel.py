"""Per-image reconstruction metrics on images in [-1, 1], measured in [0, 1]: PSNR and SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fullvq.images import to_unit_range


def _check_pair(images: torch.Tensor, reconstructions: torch.Tensor, name: str) -> None:
    if images.shape != reconstructions.shape or images.ndim != 4:
        raise ValueError(
            f"{name} needs two (B, C, H, W) batches of the same shape, got {tuple(images.shape)} and "
            f"{tuple(reconstructions.shape)}"
        )


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,), on images in [-1, 1] measured in [0, 1] (peak 1).

    Identical images give ``inf``.
    """
    _check_pair(images, reconstructions, "psnr")
    mse = (to_unit_range(images) - to_unit_range(reconstructions)).pow(2).flatten(1).mean(1).double()
    return (10 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(images: torch.Tensor, reconstructions: torch.Tensor, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), shape (B,), on images in [-1, 1] measured in [0, 1].

    Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, over every fully covered window
    ("valid") and averaged over channels: scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)``.
    """
    _check_pair(images, reconstructions, "ssim")
    height, width = images.shape[-2:]
    if min(height, width) < window_size:
        raise ValueError(
            f"ssim needs images of at least {window_size} x {window_size} pixels, got {height} x {width}; "
            f"pass a smaller window_size"
        )
    x, y = to_unit_range(images).double(), to_unit_range(reconstructions).double()
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, x.device)
    rows = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    cols = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return similarity.flatten(1).mean(1).float()



__all__ = ["psnr", "ssim"]
