"""fp32 3x3 convolutions on a CPU through NNPACK's Winograd kernels, where they run 2-3x faster than oneDNN's.

Convolutions are over 90% of the autoencoder's time and oneDNN's direct fp32 kernels already run near the cores'
FMA peak (72 GFLOP/s against 66 for MKL's sgemm on this project's 2-core AVX2 EPYC), so fewer multiply-adds is the
only way to go faster in fp32. NNPACK ships inside torch (torch itself picks it for CPU batches of 16 and more) and
computes a 3x3 convolution as a Winograd F(6x6, 3x3) transform: 128 channels at 512x512 in 0.8 s instead of 2.4 s.

Winograd rounds differently from a direct convolution: about 1e-5 of the output's scale per layer (oneDNN: ~1e-7).
So it is used only where a GroupNorm follows before anything leaves the network: 3x3 stride-1 convolutions with
at least MIN_CHANNELS input and output channels (those of the res blocks), in inference, fp32, on a CPU. The first
and last convolutions of each half (3, 4 or 8 channels) stay on oneDNN: their error would reach the image or the
latent directly, and they cost little; so do the 1x1, the stride-2 and the Upsample's 2x2 phase convolutions.
SD-VAE at 512x512 (random weights) ends 1.4e-5 (encode) and 7.6e-5 (decode) from diffusers.

On a CPU where torch runs AVX-512 kernels it is not used (nnpack_ready): there oneDNN is as fast or faster.
LATENTCTL_NNPACK=0 in the environment turns it off (oneDNN everywhere, the results of earlier versions).
"""

import functools
import os

import torch
import torch.nn.functional as F

MIN_CHANNELS = 32
BAND_BYTES = 64 * 2**20   # input per NNPACK call at most (see _nnpack)


@functools.cache
def nnpack_available() -> bool:
    """NNPACK is built into this torch, runs on this CPU (AVX2 or NEON) and LATENTCTL_NNPACK does not turn it off.
    _nnpack_available() also initialises it: without that call the convolution fails."""
    if os.environ.get("LATENTCTL_NNPACK", "1").strip() in ("0", "off", "false", "no"):
        return False
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def nnpack_ready() -> bool:
    """NNPACK is available and pays here. Its x86 kernels are AVX2; where torch runs AVX-512 (oneDNN's kernels
    twice as wide) direct convolutions in channels_last match or beat it: on a 2-core Xeon with AVX-512, 128
    channels at 512x512 took 229 ms in oneDNN channels_last against NNPACK's 293 (only 512-channel layers were
    faster in NNPACK; benchmarks/conv_kernels.py), and SD-VAE at 512x512 ran 1.41x / 1.51x diffusers fp32 without
    NNPACK against 1.24x / 1.33x with it (benchmarks/performance.py --precision). ATEN_CPU_CAPABILITY=avx2 in the
    environment brings NNPACK back there."""
    return nnpack_available() and torch.backends.cpu.get_cpu_capability() not in ("AVX512",)


def uses_nnpack(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv2d below sends this stride-1 convolution to NNPACK."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and weight.shape[2:] == (3, 3)
            and weight.shape[0] >= MIN_CHANNELS and weight.shape[1] >= MIN_CHANNELS
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and nnpack_ready())


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding) with stride 1, through NNPACK where uses_nnpack says (its output
    is NCHW-contiguous whatever x's layout)."""
    if not (uses_nnpack(x, weight) and padding < 3):
        return F.conv2d(x, weight, bias, padding=padding)
    return _nnpack(x, weight, bias, padding)


def _nnpack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """The convolution in bands of rows of at most BAND_BYTES of input each (a multiple of Winograd's 6 output
    rows). NNPACK's workspace holds the whole input and output transformed, ~3.6x the input (0.46 GB for a
    128-channel 512x512 activation), and torch keeps it for the next call; per 64 MiB band it stays under 0.25 GB.
    Smaller bands cost more: against whole-image calls, 64 MiB bands took 1.24x the time of one 128 MiB
    activation, 16 MiB bands 1.31x, 8 MiB 1.45x."""
    x, weight = x.contiguous(), weight.contiguous()
    b, _, h, w = x.shape
    k = weight.shape[2]
    out_h = h + 2 * padding - k + 1
    rows = max(6, BAND_BYTES // max(1, b * x.shape[1] * w * x.element_size()) // 6 * 6)
    if rows >= out_h:
        return torch._nnpack_spatial_convolution(x, weight, bias, [padding, padding])
    out = x.new_empty(b, weight.shape[0], out_h, w + 2 * padding - k + 1)
    for o0 in range(0, out_h, rows):
        o1 = min(o0 + rows, out_h)
        i0, i1 = o0 - padding, o1 - padding + k - 1          # input rows the band reads, in unpadded rows
        band = x[:, :, max(i0, 0):min(i1, h)]
        band = F.pad(band, (0, 0, max(0, -i0), max(0, i1 - h))) if i0 < 0 or i1 > h else band.contiguous()
        out[:, :, o0:o1] = torch._nnpack_spatial_convolution(band, weight, bias, [0, padding])
    return out


def conv(m: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a Conv2d, through NNPACK when m is a plain stride-1 zero-padded convolution that uses_nnpack takes
    (m's forward hooks then do not run; they do everywhere else, the FLOP counter's on the meta device included)."""
    if (type(m) is torch.nn.Conv2d and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple) and m.padding[0] == m.padding[1] < 3
            and uses_nnpack(x, m.weight)):
        return _nnpack(x, m.weight, m.bias, m.padding[0])
    return m(x)
