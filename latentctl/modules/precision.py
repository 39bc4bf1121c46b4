"""Precision: whether this CPU has bf16 kernels, and a model's weights held in the dtype it computes in.

Weights held in bf16 (rather than fp32 weights cast on every call under autocast) save a cast of every weight per
call and an fp32 round trip between layers. GroupNorm's affine weight and bias stay float32 on a CPU: torch's CPU
GroupNorm takes a bf16 input with float32 affines (statistics in float32 either way), which spares the affines'
rounding to bf16 (8 bits of mantissa) at no cost in speed. On CUDA every parameter is cast (its GroupNorm kernel
wants one dtype).
"""

import torch
from torch import nn


def cpu_has_bf16_kernels() -> bool:
    """True when oneDNN has bf16 kernels for this CPU (AVX-512 BF16 or AMX); without them bf16 convolutions fall to
    a path ~100x slower than fp32 (measured on an AVX2-only EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def weights_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype to hold the weights in for `compute`. bf16 holds bf16 (its range is float32's, so the pipeline's
    redo-in-fp32 on overflow is a rarity); fp16 keeps float32 weights under autocast, so that a batch that overflows
    fp16 (SDXL's VAE does) is redone in exact fp32."""
    return torch.bfloat16 if compute == torch.bfloat16 else torch.float32


def hold(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with its weights in `dtype`, in place (memory format kept); GroupNorm affines stay float32 on CPU."""
    device = next(model.parameters()).device
    model.to(dtype=dtype)
    if dtype != torch.float32 and device.type == "cpu":
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.float()
    return model
