"""Tiled encode and decode: any image size in bounded memory, with the same result as untiled.

Why other tilers seam, and why these tiles do not
-------------------------------------------------
Common tiled VAEs (diffusers' enable_tiling, ComfyUI, the A1111 extension) run each tile through the whole
network on its own. Every GroupNorm then normalises with that tile's statistics and the mid-block attention
sees only the tile, so neighbouring tiles differ in tone and contrast; the seams are blended or averaged
away, never removed. Here the network is treated as what it is: a chain of *local* operations (3x3 and
1x1 convolutions, nearest upsampling, the stride-2 downsampling, SiLU, residual additions) and two
*global* ones, GroupNorm (one mean and variance per group over the whole image) and attention.

- **Local operations** run tile by tile, each tile with exactly the halo its receptive field needs. The
  halo is not a guessed margin: for each tile, the region every layer must produce is derived backwards
  from the region wanted at the end (3x3 conv: one more pixel each side; downsample: rows 2a .. 2b of its
  input plus the pad row; nearest upsample: rows a//2 .. ceil(b/2)), clipped at the image border, where the
  convolution's own zero padding is kept. Every layer then computes exactly its region from real
  neighbours, so each output pixel sees the same numbers in the same positions as untiled: output size,
  odd shapes, border tiles and the downsample's asymmetric pad come out identical by construction, for
  any tile size and any tile offset.
- **GroupNorm** is applied with the statistics of the whole image, accumulated over a partition of the image
  into tile cores: per-group sums and sums of squares, added up in float64 across tiles (taken of x - K,
  K a per-channel reference value, so that nearly constant groups lose no precision). mean = S1/n and
  var = S2/n - mean^2 are then the whole image's, what nn.GroupNorm computes -- not an average of per-tile
  variances.
- **Attention** (the mid block, at 1/8 resolution) runs over the whole latent, untiled; when the whole block
  would not fit the budget it runs in query chunks against all keys, which is the same computation. It
  needs its input, output, keys and values whole: these 4 latent-resolution tensors are the memory floor.

The result equals untiled computation up to float rounding (measured: ~1e-5 abs on decoded images, ~100 dB;
where they differ more, e.g. retina's black border, the tiled result is the one closer to a float64
reference; bf16 runs are as close to fp32 as untiled bf16 is).

Bounded memory: hold what fits, recompute what does not
-------------------------------------------------------
The layer list is cut at *held* positions, where the whole activation (and any residual waiting to be
added) is kept; between two held positions a *segment* streams tile by tile. A GroupNorm at the start of a
segment takes its statistics from the held tensor. One inside a segment needs a pass over the image first:
tiles run from the segment's start up to that GroupNorm, with every earlier statistic already fixed, and
only the sums are kept. Each such pass recomputes the segment's prefix; that is the price of not holding
full-resolution activations (at 4096 x 4096 one 128-channel fp32 activation is 8.6 GB). A planner
(dynamic programming over positions, `plan`) chooses the cut with the least computation whose held tensors
plus one tile's working set fit the budget, and the largest tile that fits. With room, every GroupNorm
input is held and the cost is one forward pass (+ 1-pixel halos); the tighter the budget, the more is
recomputed (SD-VAE decode, planned compute vs untiled, halos included: 1024x1024 in half the untiled
memory 1.07x; 2048x2048 in 1 GiB 6.8x; 4096x4096 in 2.75 GiB 4.8x, of which the whole-latent attention,
alone as costly as all the convolutions there, is 1x; `TilePlan.describe()` tells for each call).

Where recomputing would cost more than a fifth extra, the held tensors above some size may instead live in
spill files (spill.py: written once, tile by tile, read back by region, never resident in this process), in
`spill` (default the system's temporary folder; at most half its free space). The planner prices each byte
written or read as computation (SPILL_WRITE_MACS, SPILL_READ_MACS) and keeps the size threshold whose plan is
cheapest: SD-VAE decode 2048x2048 in 1 GiB 1.39x instead of 6.8x (10 GiB on disk at most), 4096x4096 in
2.75 GiB 1.26x instead of 4.8x (24 GiB), encode 4096x4096 1.14x instead of 2.0x. The statistics are never
estimated: estimates (from a downscaled image, from a sample of tiles, or refined by
fixed-point passes) were tried and came out 17 to 32 dB from untiled on SD-VAE weights, because an error
in an early GroupNorm compounds through the next eighteen.

`auto` tiles exactly when `estimate_memory` (the untiled peak of the activations) exceeds the budget
(`default_budget`: 75% of MemAvailable, or of free + cached GPU memory on CUDA); on a CPU `encode`/`decode` take
a batch of all but small images one image at a time (`one_at_a_time`), and then the estimate and plan are per image.
Inference only: no autograd graph is kept, dropout is off. The library never prints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..modules.autoencoder import AutoencoderKL, DiagonalGaussian
from .budget import MODES, default_budget, estimate_memory, plan, should_tile
from .ops import TilingUnsupported, decoder_ops, encoder_ops
from .planning import SPILL_WORTH, TilePlan
from .running import _execute

__all__ = ["MODES", "SPILL_WORTH", "SPLIT_BYTES", "TilePlan", "TilingUnsupported", "decode", "decoder_ops",
           "default_budget", "encode", "encoder_ops", "estimate_memory", "one_at_a_time", "plan", "should_tile",
           "tiled_decode", "tiled_encode"]


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, *, tile_size: int | None = None, budget: int | None = None,
                 tile_plan: TilePlan | None = None, return_moments: bool = False, progress=None,
                 report: dict | None = None, spill: str | Path | bool = True):
    """vae.encode(x) computed in tiles: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian (or its moments).

    tile_size: tile side in image pixels (None: the largest that fits); budget: bytes for activations (None:
    default_budget); tile_plan: a plan(..., mode="on") to follow instead; progress(done, total): called after
    each tile pass; report: a dict to fill with what was done; spill: see plan."""
    tile_plan = tile_plan or plan(vae, tuple(x.shape), "encode", mode="on", budget=budget, tile_size=tile_size,
                                  spill=spill)
    moments = _execute(vae, x.to(vae.dtype), "encode", tile_plan, progress, report)  # as vae.encode: any float in
    return moments if return_moments else DiagonalGaussian(moments)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile_size: int | None = None, budget: int | None = None,
                 tile_plan: TilePlan | None = None, progress=None, report: dict | None = None,
                 spill: str | Path | bool = True) -> torch.Tensor:
    """vae.decode(z) computed in tiles: raw latents (B, C, h, w) -> images (B, 3, 8h, 8w). Arguments: tiled_encode."""
    tile_plan = tile_plan or plan(vae, tuple(z.shape), "decode", mode="on", budget=budget, tile_size=tile_size,
                                  spill=spill)
    return _execute(vae, z.to(vae.dtype), "decode", tile_plan, progress, report)


# A CPU batch goes through the model image by image once one image's full-resolution activation is this big: one
# image then already keeps every core busy and a batch's activations overflow the caches. Batch 4, 2 cores, image by
# image vs one call (`python benchmarks/performance.py --one-at-a-time`): SD-VAE at 256x256 (32 MiB) 1.01-1.09x;
# the default model at 128x128 (2 MiB) 1.03-1.12x and at 512x512 1.06-1.09x, but at 64x64 (0.5 MiB) 0.76-0.82x,
# where the per-call overhead outweighs. A GPU needs the batch to fill it.
SPLIT_BYTES = 2**20


def one_at_a_time(vae: AutoencoderKL, x: torch.Tensor, what: str) -> bool:
    """Whether `encode`/`decode` (`what`) of the batch x should feed the model one image at a time (SPLIT_BYTES)."""
    if x.device.type != "cpu" or x.shape[0] < 2:
        return False
    scale = 1 if what == "encode" else vae.config.factor
    c = vae.config
    return c.ch * c.ch_mult[0] * x.shape[2] * x.shape[3] * scale**2 * x.element_size() >= SPLIT_BYTES


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor, *, mode: str = "auto", tile_size: int | None = None,
           budget: int | None = None, dtype: torch.dtype | None = None, progress=None,
           report: dict | None = None, spill: str | Path | bool = True) -> DiagonalGaussian:
    """vae.encode(x), in tiles when `mode` says so (auto: when the untiled estimate exceeds the budget).
    On a CPU a batch of large enough images runs one image at a time (one_at_a_time), each planned on its own."""
    if one_at_a_time(vae, x, "encode"):
        parts = [encode(vae, x[i:i + 1], mode=mode, tile_size=tile_size, budget=budget, dtype=dtype,
                        progress=progress, report=report, spill=spill) for i in range(x.shape[0])]
        return DiagonalGaussian(torch.cat([torch.cat([q.mean, q.logvar], dim=1) for q in parts]))
    p = plan(vae, tuple(x.shape), "encode", mode=mode, budget=budget, tile_size=tile_size, dtype=dtype, spill=spill)
    if p.tile:
        return tiled_encode(vae, x, tile_plan=p, progress=progress, report=report)
    if report is not None:
        report.update(plan=p.describe(), tiled=False)
    return vae.encode(x)


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor, *, mode: str = "auto", tile_size: int | None = None,
           budget: int | None = None, dtype: torch.dtype | None = None, progress=None,
           report: dict | None = None, spill: str | Path | bool = True) -> torch.Tensor:
    """vae.decode(z), in tiles when `mode` says so (auto: when the untiled estimate exceeds the budget).
    On a CPU a batch of large enough images runs one image at a time (one_at_a_time), each planned on its own."""
    if one_at_a_time(vae, z, "decode"):
        return torch.cat([decode(vae, z[i:i + 1], mode=mode, tile_size=tile_size, budget=budget, dtype=dtype,
                                 progress=progress, report=report, spill=spill) for i in range(z.shape[0])])
    p = plan(vae, tuple(z.shape), "decode", mode=mode, budget=budget, tile_size=tile_size, dtype=dtype, spill=spill)
    if p.tile:
        return tiled_decode(vae, z, tile_plan=p, progress=progress, report=report)
    if report is not None:
        report.update(plan=p.describe(), tiled=False)
    return vae.decode(z)
