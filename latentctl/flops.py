"""FLOP count of an autoencoder at an image size, for achieved GFLOP/s and roofline fractions.

Convention: 2 FLOPs per multiply-add, counted for convolutions, linear layers and the attention
products; normalisation, activations, bias adds, softmax and resampling are not counted (they are
memory-bound and a few percent of the total). The count is the model's nominal one, whatever
shortcut a fast path takes. The count comes from running the model once on the
meta device (shapes only, no memory, no arithmetic) with hooks, so it follows the architecture as built.
"""

import dataclasses
import functools

import torch
from torch import nn

from .modules import AEConfig, AutoencoderKL

WHATS = ("encode", "decode")


def conv_flops(conv: nn.Conv2d, out: torch.Tensor) -> int:
    """2 x (output elements) x (multiply-adds per output element)."""
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * out.numel() * per_output


def count_module_flops(model: nn.Module, run) -> int:
    """FLOPs of `run()` over `model`: blocks with a `flops(batch, h, w)` method count themselves whole
    (their inner layers are not hooked), every other Conv2d and Linear by its output shape."""
    total = 0
    self_counting = [m for m in model.modules() if callable(getattr(m, "flops", None))]
    inside = {id(sub) for m in self_counting for sub in m.modules() if sub is not m}

    def on_block(module, args, out):
        nonlocal total
        b, _, h, w = args[0].shape
        total += module.flops(b, h, w)

    def on_layer(module, args, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += conv_flops(module, out)
        else:  # Linear: 2 x (output elements) x in_features
            total += 2 * out.numel() * module.in_features

    handles = [m.register_forward_hook(on_block) for m in self_counting]
    handles += [m.register_forward_hook(on_layer) for m in model.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inside]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


@functools.lru_cache(maxsize=256)
def _count(config: tuple, what: str, height: int, width: int, attn: str) -> int:
    cfg = AEConfig(**dict(config))
    # xformers computes exactly what sdpa does; meta tensors cannot go through xformers, so count it as sdpa.
    cfg.attn_backend = "linear" if attn == "linear" else "sdpa"
    # The reference computation is counted (grad mode takes the plain path): inference fast paths that skip
    # work, like a sub-pixel upsample, keep the nominal count, so GFLOP/s stays comparable with diffusers.
    with torch.device("meta"), torch.enable_grad():
        model = AutoencoderKL(cfg).eval()
        f = cfg.factor
        if what == "encode":
            x = torch.empty(1, cfg.in_channels, height, width)
            return count_module_flops(model, lambda: model.encode(x))
        z = torch.empty(1, cfg.latent_channels, height // f, width // f)
        return count_module_flops(model, lambda: model.decode(z))


def model_flops(config: AEConfig, what: str, size: int | tuple[int, int], attn: str = "sdpa", batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) to encode images of `size` (H, W or one side), or decode their latents."""
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, not {what!r}")
    height, width = (size, size) if isinstance(size, int) else size
    fields = tuple((f.name, _freeze(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name != "extra")
    return batch * _count(fields, what, height, width, attn)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value
