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


# Eight uniform colours (8-bit RGB) that a VAE should give back unchanged: near-black, near-white, mid grey, the
# saturated primaries, a blue-grey and a skin tone. Flat images give GroupNorm almost no variance, so they expose
# what zero padding does at the borders (the default model v1 drew a blob in the top-right corner on them).
FLAT_COLOURS = [(8, 8, 8), (247, 247, 247), (128, 128, 128), (235, 20, 20), (20, 200, 40), (25, 40, 230),
                (30, 90, 160), (225, 170, 140)]


def block_errors(a: torch.Tensor, b: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Mean absolute error of each block x block tile (over its pixels and channels) of images (C, H, W):
    a (H // block, W // block) float64 map; a partial last row or column of tiles is left out."""
    d = (a.double() - b.double()).abs().mean(0)
    h, w = d.shape[0] // block * block, d.shape[1] // block * block
    return d[:h, :w].reshape(h // block, block, w // block, block).mean((1, 3))


def edge_errors(a: torch.Tensor, b: torch.Tensor, block: int = 16) -> dict:
    """Where the error sits, from block_errors: the four corner blocks (top-left, top-right, bottom-left,
    bottom-right), the median block (the mean of the two middle ones for an even count), the mean of the outer
    ring of blocks (border) and of the rest (centre)."""
    e = block_errors(a, b, block)
    ring = torch.ones_like(e, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    centre = e[~ring] if (~ring).any() else e.flatten()
    return {"corners": [float(e[0, 0]), float(e[0, -1]), float(e[-1, 0]), float(e[-1, -1])],
            "median": float(e.flatten().quantile(0.5)), "border": float(e[ring].mean()), "centre": float(centre.mean())}
