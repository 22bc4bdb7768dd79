"""Reconstruction metrics for images in [-1, 1]: PSNR and SSIM (Wang et al. 2004), per image, float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """10 log10(range^2 / MSE) per image; range 2 for images in [-1, 1]."""
    _check_pair(x, y)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM per image: Gaussian-weighted local statistics (window 11, sigma 1.5), 'valid'
    borders, population (1/N) covariances, averaged over channels — the settings of Wang et al. 2004 and of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731
    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
