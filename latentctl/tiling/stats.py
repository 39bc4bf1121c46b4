"""GroupNorm statistics summed over tile cores: the whole image's mean and variance, exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupStats:
    """A GroupNorm's input statistics per (sample, group), summed over tile cores, and the GroupNorm they define
    (biased variance, the module's eps and affine weights).

    Per channel: the pixel count n, the sum S1 and the sum of squares S2 over every tile core, taken of
    x - K with K the channel's mean over the first rows seen (shifted sums: the same totals, without the
    cancellation of S2/n - mean^2 where a group is nearly constant, e.g. a black border). The group's mean
    and biased variance follow exactly, what nn.GroupNorm computes over the whole image -- not an average of
    per-tile variances. Partial sums over at most 16K pixels are float32, their totals float64."""

    BAND = 1 << 14      # pixels per channel in one float32 partial sum (its x - K temporary stays small)

    def __init__(self, module: nn.GroupNorm, batch: int, device):
        self.module, self.groups, self.n = module, module.num_groups, 0
        self.shift = None                       # K, (B, C, 1, 1)
        self.s1 = self.s2 = None                # sums of (x - K) and (x - K)^2 per channel, float64 (B, C)
        self._affine = None

    def add(self, x: torch.Tensor) -> "GroupStats":
        b, c, h, w = x.shape
        rows = max(1, self.BAND // max(w, 1))
        for y in range(0, h, rows):
            band = x[:, :, y:y + rows]
            if band.dtype not in (torch.float32, torch.float64):
                band = band.float()
            if self.shift is None:
                self.shift = band.mean(dim=(2, 3), keepdim=True)
                self.s1 = torch.zeros(b, c, dtype=torch.float64, device=x.device)
                self.s2 = torch.zeros_like(self.s1)
            d = band - self.shift
            self.s1 += d.sum(dim=(2, 3)).double()
            self.s2 += torch.linalg.vector_norm(d, dim=(2, 3)).double() ** 2
        self.n += h * w
        self._affine = None
        return self

    @classmethod
    def of(cls, module: nn.GroupNorm, x: torch.Tensor) -> "GroupStats":
        """Statistics of a whole held tensor in memory (a spilled one's are summed as its tiles are written)."""
        return cls(module, x.shape[0], x.device).add(x)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, group): mean and sqrt(biased variance + eps), float64."""
        b, c = self.s1.shape
        k = self.shift.double().view(b, c)
        mean = (k + self.s1 / self.n).view(b, self.groups, -1).mean(-1)               # (B, G)
        off = mean.repeat_interleave(c // self.groups, dim=1) - k                     # group mean - K, (B, C)
        sq = self.s2 - 2 * off * self.s1 + self.n * off * off                         # sum of (x - mean)^2
        var = sq.view(b, self.groups, -1).sum(-1) / (self.n * (c // self.groups))
        return mean, torch.sqrt(var.clamp_min(0.0) + self.module.eps)

    def apply(self, x: torch.Tensor, act: bool) -> torch.Tensor:
        """GroupNorm of x with these statistics (x * a + b per channel, the form torch's kernel uses), then SiLU."""
        if self._affine is None or self._affine[0].device != x.device:
            mean, std = self.mean_std()
            per = x.shape[1] // self.groups
            scale = (1.0 / std).repeat_interleave(per, dim=1) * self.module.weight.double()[None]
            shift = self.module.bias.double()[None] - mean.repeat_interleave(per, dim=1) * scale
            self._affine = (scale.float()[:, :, None, None], shift.float()[:, :, None, None])
        scale, shift = self._affine
        y = torch.addcmul(shift, x, scale)
        if act:
            y = F.silu(y, inplace=True)
        return y if y.dtype == x.dtype else y.to(x.dtype)
