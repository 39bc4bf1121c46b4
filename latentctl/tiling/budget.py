"""The memory budget and the decision to tile: the untiled estimate, the default budget, plan()."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import UsageError
from ..modules.autoencoder import AutoencoderKL
from ..spill import free_bytes
from .ops import _Net, decoder_ops, encoder_ops
from .planning import SPILL_WORTH, TilePlan, _plan_segments, _untiled_peak

MODES = ("auto", "on", "off")

def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_budget(device: torch.device | str = "cpu") -> int:
    """Bytes the activations may use: 75% of free RAM (MemAvailable), or of free + cached memory on a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(0.75 * (free + cached))
    return int(0.75 * _mem_available())


def _net(vae: AutoencoderKL, shape: tuple, what: str, dtype: torch.dtype | None) -> _Net:
    if what not in ("encode", "decode"):
        raise UsageError(f"tiling: what={what!r}; choose encode or decode")
    if len(shape) != 4:
        raise UsageError(f"tiling: expected a (B, C, H, W) shape, got {tuple(shape)}")
    dtype = dtype or next(vae.parameters()).dtype
    ops = encoder_ops(vae) if what == "encode" else decoder_ops(vae)
    return _Net(ops, tuple(shape[1:]), shape[0], torch.empty((), dtype=dtype).element_size())


def estimate_memory(vae: AutoencoderKL, shape: tuple, what: str, dtype: torch.dtype | None = None) -> int:
    """Predicted peak activation bytes (weights not included) of untiled vae.encode / vae.decode of an input of
    `shape` (B, C, H, W): the image for encode, the latent for decode; dtype: the compute precision."""
    return _untiled_peak(_net(vae, shape, what, dtype))


def should_tile(mode: str, estimate: int, budget: int) -> bool:
    """on: always; off: never; auto: exactly when the estimate exceeds the budget."""
    if mode not in MODES:
        raise UsageError(f"--tile {mode!r}: choose one of {', '.join(MODES)}")
    return mode == "on" or (mode == "auto" and estimate > budget)


def plan(vae: AutoencoderKL, shape: tuple, what: str, *, mode: str = "auto", budget: int | None = None,
         tile_size: int | None = None, dtype: torch.dtype | None = None, spill: str | Path | bool = True) -> TilePlan:
    """Whether and how to tile vae.encode / vae.decode of an input of `shape` within `budget` bytes of
    activations (None: default_budget for the model's device). tile_size: tile side in image pixels
    (None: the largest that fits). spill: a folder where whole activations that do not fit may be kept
    instead of recomputed (True: the system's temporary folder on CPU, none on a GPU; False: never), used
    only where that saves at least a fifth of the computation, within half the folder's free space."""
    if tile_size is not None and tile_size < 1:
        raise UsageError(f"--tile-size {tile_size}: must be a positive number of pixels")
    if budget is not None and budget <= 0:
        raise UsageError(f"--max-memory {budget}: must be a positive number of bytes")
    net = _net(vae, shape, what, dtype)
    budget = default_budget(next(vae.parameters()).device) if budget is None else int(budget)
    estimate = _untiled_peak(net)
    p = TilePlan(what, tuple(shape), should_tile(mode, estimate, budget), mode, estimate, budget)
    if not p.tile:
        return p
    image_hw = net.size(0) if what == "encode" else net.size(net.n)
    p.segments, p.cost_ratio, p.fits = _plan_segments(net, budget, tile_size, image_hw)
    on_cpu = next(vae.parameters()).device.type == "cpu"   # a GPU recomputes far faster than a disk keeps up
    folder = (tempfile.gettempdir() if on_cpu else "") if spill is True else str(spill) if spill else ""
    base = p.cost_ratio
    if folder and SPILL_WORTH * base > 1.0:
        disk = free_bytes(folder) // 2
        sizes = sorted({net.shape_bytes(q) for q in range(net.n + 1)} | {0})
        for over in sizes:     # spill every held tensor over `over` bytes; the cheapest such plan
            segments, ratio, fits = _plan_segments(net, budget, tile_size, image_hw, over, disk)
            if segments and fits >= p.fits and ratio < SPILL_WORTH * base and ratio < p.cost_ratio:
                p.segments, p.cost_ratio, p.fits, p.spill_over, p.spill_dir = segments, ratio, fits, over, folder
    p.peak = max(s.memory for s in p.segments)
    return p
