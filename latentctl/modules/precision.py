"""Precision: whether this CPU has bf16 kernels, and a model's weights held in the dtype it computes in.

Weights held in bf16 (rather than fp32 weights cast on every call under autocast) save a cast of every weight per
call and an fp32 round trip between layers. GroupNorm's affine weight and bias stay float32 on a CPU: torch's CPU
GroupNorm takes a bf16 input with float32 affines (statistics in float32 either way), which spares the affines'
rounding to bf16 (8 bits of mantissa) at no cost in speed. On CUDA every parameter is cast (its GroupNorm kernel
wants one dtype).

The layout follows the dtype on a CPU (cpu_layout): fp32 runs NCHW when its 3x3 convolutions go to NNPACK
(fastconv.py, which takes NCHW), everything else channels_last (oneDNN's preferred layout on a CPU).
"""

import platform

import torch
from torch import nn

from . import fastconv


def cpu_has_bf16_kernels() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX-512 BF16 or AMX); without them bf16 convolutions fall to
    a path ~100x slower than fp32 (measured on an AVX2-only EPYC). On x86 torch's own kernels must be its AVX-512
    ones too: under ATEN_CPU_CAPABILITY=avx2 on an AMX Xeon, bf16 fails ("pack_vnni2 is only supported when avx512
    is supported", torch 2.13)."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return onednn and not (x86 and torch.backends.cpu.get_cpu_capability() != "AVX512")


def weights_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype to hold the weights in for `compute`. bf16 holds bf16 (its range is float32's, so the pipeline's
    redo-in-fp32 on overflow is a rarity); fp16 keeps float32 weights under autocast, so that a batch that overflows
    fp16 (SDXL's VAE does) is redone in exact fp32."""
    return torch.bfloat16 if compute == torch.bfloat16 else torch.float32


def cpu_layout(dtype: torch.dtype) -> torch.memory_format:
    """The memory format a model computing in `dtype` runs fastest in on this CPU: NCHW for fp32 when NNPACK serves
    its 3x3 convolutions (2.2x oneDNN's speed for SD-VAE, which NCHW spares a copy per convolution), else
    channels_last (oneDNN's direct kernels: bf16, and fp32 without NNPACK)."""
    if dtype == torch.float32 and fastconv.nnpack_ready():
        return torch.contiguous_format
    return torch.channels_last


def hold(model: nn.Module, dtype: torch.dtype, memory_format: torch.memory_format | None = None) -> nn.Module:
    """`model` with its weights in `dtype`, in place; GroupNorm affines stay float32 on CPU. On a CPU the weights
    take `memory_format`, by default cpu_layout(dtype); on CUDA the layout is kept unless one is given."""
    device = next(model.parameters()).device
    if memory_format is None and device.type == "cpu":
        memory_format = cpu_layout(dtype)
    model.to(dtype=dtype)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    if dtype != torch.float32 and device.type == "cpu":
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.float()
    return model
