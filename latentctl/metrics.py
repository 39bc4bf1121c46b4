"""Image quality: PSNR and SSIM (Wang et al. 2004), on images (C, H, W) or (B, C, H, W) with values in [0, data_range].

SSIM uses the paper's settings: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, local
statistics without the sample-covariance correction, averaged over the positions where the window fits
inside the image and over channels. This equals skimage's
structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=...).
"""

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all values; inf when a == b."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """1-D Gaussian weights (size,), summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM over channels and window positions. Images smaller than the window are refused."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.double(), b.double()
    if x.ndim == 3:
        x, y = x[None], y[None]
    n, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"ssim: image {h}x{w} is smaller than the {win_size}x{win_size} window")
    g = gaussian_window(win_size, sigma).to(x.device)
    # One depthwise separable blur for all five statistics: (B*C, 1, H, W) each, stacked on the batch axis.
    planes = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * n * c, 1, h, w)
    blurred = F.conv2d(planes, g.view(1, 1, 1, -1))   # along width, valid positions only
    blurred = F.conv2d(blurred, g.view(1, 1, -1, 1))  # along height
    mu_x, mu_y, xx, yy, xy = blurred.reshape(5, n * c, *blurred.shape[-2:])
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()
