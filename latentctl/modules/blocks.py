"""Building blocks shared by the autoencoder and the U-Net: norm, resnet block, resampling."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fastconv import conv


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    # eps 1e-6 (not torch's 1e-5) is what every public VAE was trained with.
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class FixedGroupNorm(nn.GroupNorm):
    """A GroupNorm with fixed statistics (buffers `fixed_mean`, `fixed_var`, calibrated once in training) instead
    of each image's: a per-channel affine map, which keeps the input's magnitude and looks at no other pixel.
    Why: with per-image statistics a decoder can game its norms with a spike at a fixed spot (StyleGAN2's
    "droplet": the default model's top-right blob). Affine weights stay those of the GroupNorm it replaces."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.register_buffer("fixed_mean", torch.zeros(num_channels))
        self.register_buffer("fixed_var", torch.ones(num_channels))

    def scale_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x * a + b per channel, shaped (1, C, 1, 1), computed in float32 and given in `dtype`."""
        a = self.weight.float() * torch.rsqrt(self.fixed_var.float() + self.eps)
        b = self.bias.float() - self.fixed_mean.float() * a
        return a.to(dtype).view(1, -1, 1, 1), b.to(dtype).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.scale_shift(x.dtype)
        return torch.addcmul(b, x, a)


def fix_norms(module: nn.Module) -> list[FixedGroupNorm]:
    """Every GroupNorm inside `module` replaced, in place, by a FixedGroupNorm with its affine weights and
    statistics 0 / 1 (to be calibrated or loaded); returns them in module order."""
    fixed = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                norm = FixedGroupNorm(child.num_groups, child.num_channels, child.eps)
                norm.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, name, norm.to(child.weight.device))
                fixed.append(norm)
    return fixed


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """swish(norm(x)); in inference the swish runs in place on the fresh norm output (one buffer less)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim): [sin | cos], DDPM frequencies."""
    half = dim // 2
    # float64: at t ~ 1000 the float32 rounding of t * freq alone shifts the phase by ~1e-4
    freqs = torch.exp(torch.arange(half, dtype=torch.float64, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.double()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, optional timestep projection, 1x1 (or 3x3) shortcut when width changes."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == self.out_channels:
            return x
        return conv(self.conv_shortcut, x) if hasattr(self, "conv_shortcut") else self.nin_shortcut(x)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = conv(self.conv1, norm_swish(self.norm1, x))  # (fastconv: NNPACK in fp32 inference on a CPU)
        if temb is not None:
            h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = conv(self.conv2, self.dropout(norm_swish(self.norm2, h)))
        return h.add_(self.shortcut(x)) if not torch.is_grad_enabled() else self.shortcut(x) + h


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv after padding right/bottom by one (the original asymmetric pad), or avg-pool."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, 2, 2)
        # The unpadded form only in float32: in bf16 (held or under autocast) oneDNN's AMX kernels gave NaN or
        # 7-10% error for it on a Xeon with AMX (the padded conv: 0.2%, as in fp32); bf16 halves the copy anyway.
        dev = x.device.type   # (autocast knows cpu and cuda; the FLOP counter runs on meta)
        reduced = x.dtype != torch.float32 or (dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev))
        if torch.is_grad_enabled() or reduced or min(x.shape[2:]) < 3:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.unpadded_forward(x)

    def unpadded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same result without copying the whole input into a padded tensor (at full resolution that copy
        costs as much as a third of the conv): only the last output row and column read the pad, and only when
        the side is even; they are computed from the last two input rows / columns and appended."""
        h, w = x.shape[2:]
        y = self.conv(x)
        if w % 2 == 0:
            y = torch.cat([y, self.conv(F.pad(x[:, :, :, w - 2:], (0, 1, 0, 0)))], dim=3)
        if h % 2 == 0:
            y = torch.cat([y, self.conv(F.pad(x[:, :, h - 2:], (0, 1, 0, 1)))], dim=2)
        return y


# Which 3x3 taps fall on each of the two input rows (columns) an output of a given parity reads after a nearest x2
# upsample: parity 0 reads rows (a-1, a) with taps (0, 1+2); parity 1 reads (a, a+1) with taps (0+1, 2).
_TAPS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # (parity, 2 input rows, 3 taps)
_FOLD = torch.einsum("par,qbs->pqabrs", _TAPS, _TAPS).reshape(16, 9)       # (py px a b, 3x3 taps): sums of taps


def fold_phases(w: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (O, I, 3, 3) -> the four 2x2 phase weights (4*O, I, 2, 2) of Upsample.subpixel_forward,
    phases in the order (0,0), (0,1), (1,0), (1,1); one small matmul, summed in fp32 whatever w's dtype."""
    o, i = w.shape[:2]
    folded = w.reshape(o * i, 9).float() @ _FOLD.to(w.device).T        # (O*I, 16): py, px, a, b
    return folded.view(o, i, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5).reshape(4 * o, i, 2, 2).to(w.dtype)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if torch.is_grad_enabled():
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.subpixel_forward(x)

    def subpixel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same result without building the upsampled input: 2.25x fewer multiply-adds.

        After a nearest x2 upsample, each output pixel's 3x3 window covers only 2x2 input pixels, so each of
        the four output phases (row parity py, column parity px) is a 2x2 conv of the input with the 3x3
        taps summed onto those 2x2 pixels. One 2x2 conv with 4C outputs computes all phases on the input
        padded by one; phase (py, px) is its output shifted by (py, px).
        """
        b, c, h, w = x.shape
        weight = self._phase_weight(x.dtype)
        y = F.conv2d(x, weight, self.conv.bias.repeat(4).to(x.dtype), padding=1)  # (B, 4C, H+1, W+1)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty(b, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for p, (py, px) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[:, :, py::2, px::2] = y[:, p * c:(p + 1) * c, py:py + h, px:px + w]
        return out

    def _phase_weight(self, dtype) -> torch.Tensor:
        # Folded on every call, never cached: a cache keyed on the weight's version misses in-place reloads of
        # weights made in inference mode (they have no version counter), and the fold costs well under 1% of
        # the convolution that follows (a (C*C, 9) x (9, 16) product).
        return fold_phases(self.conv.weight).to(dtype)
