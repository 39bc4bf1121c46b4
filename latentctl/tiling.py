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

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .modules import fastconv
from .modules.attention import AttnBlock, LinAttnBlock, NoAttn
from .modules.autoencoder import AutoencoderKL, DiagonalGaussian
from .modules.blocks import Downsample, ResnetBlock, Upsample
from .spill import SpilledTensor, free_bytes

MODES = ("auto", "on", "off")


class TilingUnsupported(UsageError):
    """The model holds a layer this tiler does not know how to split (e.g. a temporal decoder)."""


# --- the network as a flat list of operations -------------------------------------------------------------------

@dataclass
class Op:
    """One layer. kind: conv | down | pool | up | norm | push | add | tanh | attn (attn is the only global one)."""

    kind: str
    module: nn.Module | None = None
    pad: int = 0            # conv / add-shortcut: zero padding each side (kernel = 2*pad + 1)
    act: bool = False       # norm: SiLU after it
    name: str = ""


def _conv(m: nn.Module, name: str) -> Op:
    if type(m) is not nn.Conv2d or m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 \
            or m.padding_mode != "zeros" or m.kernel_size[0] != m.kernel_size[1] \
            or m.padding != (m.kernel_size[0] // 2,) * 2 or m.kernel_size[0] % 2 == 0:
        raise TilingUnsupported(f"tiling: {name} is not a plain odd-kernel stride-1 'same' convolution ({m})")
    return Op("conv", m, pad=m.padding[0], name=name)


def _norm(m: nn.Module, name: str, act: bool = True) -> Op:
    if type(m) is not nn.GroupNorm or not m.affine:
        raise TilingUnsupported(f"tiling: {name} is not an affine GroupNorm ({type(m).__name__})")
    return Op("norm", m, act=act, name=name)


def _resblock(block: nn.Module, name: str) -> list[Op]:
    if type(block) is not ResnetBlock:
        raise TilingUnsupported(f"tiling: {name} is a {type(block).__name__}, not a ResnetBlock")
    if hasattr(block, "conv_shortcut"):
        shortcut = _conv(block.conv_shortcut, f"{name}.conv_shortcut")
    elif hasattr(block, "nin_shortcut"):
        shortcut = _conv(block.nin_shortcut, f"{name}.nin_shortcut")
    else:
        shortcut = None
    return [Op("push", name=name),
            _norm(block.norm1, f"{name}.norm1"), _conv(block.conv1, f"{name}.conv1"),
            _norm(block.norm2, f"{name}.norm2"), _conv(block.conv2, f"{name}.conv2"),  # dropout: eval only
            Op("add", shortcut.module if shortcut else None, pad=shortcut.pad if shortcut else 0, name=name)]


def _attn(m: nn.Module, name: str) -> list[Op]:
    if type(m) is NoAttn:
        return []
    if type(m) not in (AttnBlock, LinAttnBlock):
        raise TilingUnsupported(f"tiling: {name} is a {type(m).__name__}, not a known attention block")
    return [Op("attn", m, name=name)]


def encoder_ops(vae: AutoencoderKL) -> list[Op]:
    """The encoder (and quant_conv) as a list of operations, in the order Encoder.forward runs them."""
    enc = vae.encoder
    ops = [_conv(enc.conv_in, "encoder.conv_in")]
    for i, level in enumerate(enc.down):
        for j, block in enumerate(level.block):
            ops += _resblock(block, f"encoder.down.{i}.block.{j}")
            if len(level.attn):
                ops += _attn(level.attn[j], f"encoder.down.{i}.attn.{j}")
        if i != enc.num_levels - 1:
            ds = level.downsample
            if type(ds) is not Downsample:
                raise TilingUnsupported(f"tiling: encoder.down.{i}.downsample is a {type(ds).__name__}")
            ops.append(Op("down", ds.conv, name=f"encoder.down.{i}.downsample") if ds.with_conv
                       else Op("pool", name=f"encoder.down.{i}.downsample"))
    ops += _resblock(enc.mid.block_1, "encoder.mid.block_1") + _attn(enc.mid.attn_1, "encoder.mid.attn_1")
    ops += _resblock(enc.mid.block_2, "encoder.mid.block_2")
    ops += [_norm(enc.norm_out, "encoder.norm_out"), _conv(enc.conv_out, "encoder.conv_out")]
    if vae.quant_conv is not None:
        ops.append(_conv(vae.quant_conv, "quant_conv"))
    return ops


def decoder_ops(vae: AutoencoderKL) -> list[Op]:
    """post_quant_conv and the decoder as a list of operations, in the order Decoder.forward runs them."""
    dec = vae.decoder
    ops = [_conv(vae.post_quant_conv, "post_quant_conv")] if vae.post_quant_conv is not None else []
    ops.append(_conv(dec.conv_in, "decoder.conv_in"))
    ops += _resblock(dec.mid.block_1, "decoder.mid.block_1") + _attn(dec.mid.attn_1, "decoder.mid.attn_1")
    ops += _resblock(dec.mid.block_2, "decoder.mid.block_2")
    for i in reversed(range(dec.num_levels)):
        level = dec.up[i]
        for j, block in enumerate(level.block):
            ops += _resblock(block, f"decoder.up.{i}.block.{j}")
            if len(level.attn):
                ops += _attn(level.attn[j], f"decoder.up.{i}.attn.{j}")
        if i != 0:
            us = level.upsample
            if type(us) is not Upsample:
                raise TilingUnsupported(f"tiling: decoder.up.{i}.upsample is a {type(us).__name__}")
            ops.append(Op("up", name=f"decoder.up.{i}.upsample"))
            if us.with_conv:
                ops.append(_conv(us.conv, f"decoder.up.{i}.upsample.conv"))
    if not dec.give_pre_end:
        ops += [_norm(dec.norm_out, "decoder.norm_out"), _conv(dec.conv_out, "decoder.conv_out")]
        if dec.tanh_out:
            ops.append(Op("tanh", name="decoder.tanh"))
    return ops


class _Net:
    """Ops plus, for every position p (before op p; p == len(ops) is the output), the running tensor's
    (C, H, W) and the residuals waiting on the stack (by the index of the push op that saved them)."""

    def __init__(self, ops: list[Op], in_shape: tuple, batch: int, esize: int):
        self.ops, self.batch, self.esize = ops, batch, esize
        c, h, w = in_shape
        self.shape, self.alive = [], []
        stack: list[int] = []
        for i, op in enumerate(ops):
            self.shape.append((c, h, w))
            self.alive.append(tuple(stack))
            if op.kind == "conv":
                c = op.module.out_channels
            elif op.kind == "down":
                c, h, w = op.module.out_channels, (h - 2) // 2 + 1, (w - 2) // 2 + 1
            elif op.kind == "pool":
                h, w = h // 2, w // 2
            elif op.kind == "up":
                h, w = 2 * h, 2 * w
            elif op.kind == "push":
                stack.append(i)
            elif op.kind == "add":
                if not stack:
                    raise TilingUnsupported("tiling: residual add without a saved input")
                stack.pop()
            if h < 1 or w < 1:
                raise UsageError(f"tiling: input {in_shape[1]}x{in_shape[2]} is too small for this network")
        self.shape.append((c, h, w))
        self.alive.append(tuple(stack))
        self.n = len(ops)
        self.cache: dict = {}     # planning results that do not depend on the budget

    def size(self, p: int) -> tuple[int, int]:
        return self.shape[p][1:]

    def state_bytes(self, p: int, skips=None) -> int:
        """Bytes held at position p: the running tensor and the residuals on the stack (or those in `skips`)."""
        c, h, w = self.shape[p]
        total = c * h * w
        for j in (self.alive[p] if skips is None else skips):
            cj, hj, wj = self.shape[j]
            total += cj * hj * wj
        return total * self.batch * self.esize

    def shape_bytes(self, p: int) -> int:
        """Bytes of the running tensor at position p."""
        c, h, w = self.shape[p]
        return c * h * w * self.batch * self.esize

    def op_cost(self, i: int) -> float:
        """Multiply-adds of op i over the whole image; elementwise work counted as a few MACs per element."""
        op, (c, h, w), (c2, h2, w2) = self.ops[i], self.shape[i], self.shape[i + 1]
        b = self.batch
        if op.kind in ("conv", "down"):
            k = op.module.kernel_size[0]
            return b * (c * c2 * k * k + 8.0 * c2) * h2 * w2
        if op.kind == "add":
            extra = c * c2 * (2 * op.pad + 1) ** 2 if op.module is not None else 0
            return b * (extra + 8.0 * c2) * h2 * w2
        if op.kind == "attn":
            return b * (2.0 * (h * w) ** 2 * c + 4.0 * c * c * h * w)
        return b * (64.0 if op.kind == "norm" else 8.0) * c2 * h2 * w2


# --- regions: (y0, y1, x0, x1), half-open, at one position's resolution -------------------------------------------

def _hull(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _grow(r, p: int, h: int, w: int):
    return None if r is None else (max(r[0] - p, 0), min(r[1] + p, h), max(r[2] - p, 0), min(r[3] + p, w))


def _area(r) -> int:
    return 0 if r is None else max(r[1] - r[0], 0) * max(r[3] - r[2], 0)


def _crop(t: torch.Tensor, have, want) -> torch.Tensor:
    """The part `want` of a tensor that covers region `have` (a view)."""
    return t[:, :, want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2]]


def _needed(op: Op, r, h: int, w: int):
    """Region of op's input needed for region r of its output; (h, w) is the input's size."""
    if r is None:
        return None
    if op.kind == "conv":
        return _grow(r, op.pad, h, w)
    if op.kind == "down":  # output row i reads padded-input rows 2i .. 2i+2; row h is the zero pad
        return (2 * r[0], min(2 * r[1] + 1, h), 2 * r[2], min(2 * r[3] + 1, w))
    if op.kind == "pool":
        return (2 * r[0], 2 * r[1], 2 * r[2], 2 * r[3])
    if op.kind == "up":
        return (r[0] // 2, (r[1] + 1) // 2, r[2] // 2, (r[3] + 1) // 2)
    return r


def _requirements(net: _Net, a: int, t: int, out_r, keep_skips: bool) -> list:
    """Regions of the running tensor needed at positions a..t for region out_r at t (and, with keep_skips,
    for the same region of the residuals that were pushed inside a..t and still wait at t)."""
    req = [None] * (t + 1)
    sk = [out_r if (keep_skips and j >= a) else None for j in net.alive[t]]
    r = req[t] = out_r
    for i in range(t - 1, a - 1, -1):
        op = net.ops[i]
        h, w = net.size(i)
        if op.kind == "add":        # forward pops a residual and adds shortcut(residual): it needs r grown
            sk.append(_grow(r, op.pad, h, w))
        elif op.kind == "push":     # forward saves the running tensor: it must cover the residual's need too
            r = _hull(r, sk.pop())
        else:
            r = _needed(op, r, h, w)
        req[i] = r
    return req


def _conv_region(m: nn.Conv2d, pad: int, t: torch.Tensor, have, out_r, h: int, w: int) -> torch.Tensor:
    """Region out_r of a stride-1 'same' conv. Away from the image border the input reaches `pad` further on
    every side and the conv is 'valid'. At the border the conv's own zero padding serves, and on the other
    sides the outputs that padding spoilt are cropped away."""
    need = (out_r[0] - pad, out_r[1] + pad, out_r[2] - pad, out_r[3] + pad)
    clip = _grow(out_r, pad, h, w)
    if clip == need:
        return fastconv.conv2d(_crop(t, have, clip), m.weight, m.bias)
    y = fastconv.conv2d(_crop(t, have, clip), m.weight, m.bias, padding=pad)
    return y if clip == out_r else _crop(y, clip, out_r)


def _apply_op(op: Op, cur: torch.Tensor, have, out_r, h: int, w: int, stats) -> torch.Tensor:
    """A local op on a tile: `cur` covers `have` at the op's input size (h, w); returns out_r of its output."""
    if op.kind == "conv":
        return _conv_region(op.module, op.pad, cur, have, out_r, h, w)
    if op.kind == "down":
        src = _needed(op, out_r, h, w)
        x = _crop(cur, have, src)
        pads = (0, 2 * out_r[3] + 1 - src[3], 0, 2 * out_r[1] + 1 - src[1])  # the zero row/col at the far border
        return F.conv2d(F.pad(x, pads) if any(pads) else x, op.module.weight, op.module.bias, stride=2)
    if op.kind == "pool":
        return F.avg_pool2d(_crop(cur, have, _needed(op, out_r, h, w)), 2, 2)
    if op.kind == "up":
        src = _needed(op, out_r, h, w)
        x = F.interpolate(_crop(cur, have, src), scale_factor=2.0, mode="nearest")
        return _crop(x, (2 * src[0], 2 * src[1], 2 * src[2], 2 * src[3]), out_r)
    if op.kind == "norm":
        return stats.apply(_crop(cur, have, out_r), op.act)
    if op.kind == "tanh":
        return torch.tanh(_crop(cur, have, out_r))
    raise AssertionError(f"not a local op: {op.kind}")


# --- GroupNorm statistics ----------------------------------------------------------------------------------------

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


# --- attention over the whole latent -----------------------------------------------------------------------------

ATTN_WHOLE = 7      # an AttnBlock's forward holds about this many copies of its input (x, norm, q, k, v, out, sum)


def _attention_whole(x_bytes: int, room: int) -> bool:
    """Whether an attention block's plain forward fits `room` bytes beyond its input and output."""
    return (ATTN_WHOLE - 2) * x_bytes <= room


def _global_attention(block: nn.Module, x: torch.Tensor, room: int) -> torch.Tensor:
    """The attention block on a held tensor: whole when it fits `room` bytes beyond its input and output, else
    the same computation in query chunks against all keys and values (held: 2 more copies of x)."""
    b, c, h, w = x.shape
    nbytes = x.numel() * x.element_size()
    if type(block) is not AttnBlock or block.window or _attention_whole(nbytes, room):
        return block(x)     # a windowed block needs only one window's room
    stats = GroupStats.of(block.norm, x)

    def project(conv, rows):  # as AttnBlock does it: the 1x1 conv as a linear map on (B, N, C) tokens
        tokens = stats.apply(x[:, :, rows], act=False).flatten(2).transpose(1, 2)
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)   # (B, rows*W, C), C contiguous

    band = max(1, (16 << 20) // max(1, b * w * c * x.element_size()))
    k = v = None
    for y0 in range(0, h, band):
        rows = slice(y0, min(y0 + band, h))
        kb, vb = project(block.k, rows), project(block.v, rows)
        if k is None:   # the projections' dtype: under autocast it is not x's
            k = torch.empty(b, h * w, c, dtype=kb.dtype, device=x.device)
            v = torch.empty_like(k)
        k[:, rows.start * w:rows.stop * w] = kb
        v[:, rows.start * w:rows.stop * w] = vb
        del kb, vb
    out = torch.empty_like(x)
    per_row = 4 * b * w * c * x.element_size()     # q, attention output, projection, sum for one row of queries
    q_rows = int(max(1, min(h, (room - 2 * nbytes) // per_row)))
    for y0 in range(0, h, q_rows):
        rows = slice(y0, min(y0 + q_rows, h))
        o = block.attend(project(block.q, rows), k, v)           # each query attends to every key: exact
        o = F.linear(o, block.proj_out.weight.flatten(1), block.proj_out.bias)
        out[:, :, rows] = x[:, :, rows] + o.transpose(1, 2).reshape(b, c, rows.stop - rows.start, w)
    return out


# --- planning ----------------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """Positions a..b of the layer list: a and b are held whole; between them tiles stream ("tiles"), or a
    global op runs on the held tensor ("global")."""

    a: int
    b: int
    kind: str
    tile: int = 0             # tile side in image pixels
    steps: int = 0            # tile passes: one per tile per GroupNorm inside, plus the final one
    memory: int = 0           # predicted bytes: held tensors at both ends + one tile's working set
    cost: float = 0.0         # multiply-adds, recomputation included
    room: int = 0             # global: bytes the op may use beyond its held input and output
    spilled: int = 0          # bytes of the held tensors that are in spill files


@dataclass
class TilePlan:
    """How one call runs: whether it tiles and, if so, the segments. Bytes for `estimate`, `budget`, `peak`."""

    what: str
    shape: tuple
    tile: bool
    mode: str
    estimate: int             # untiled peak activation bytes (estimate_memory)
    budget: int
    segments: list = field(default_factory=list)
    peak: int = 0             # predicted peak activation bytes when tiled
    cost_ratio: float = 1.0   # predicted compute / untiled compute
    fits: bool = True         # False: no cut fits the budget; the one needing least memory is used
    spill_over: int | None = None   # held tensors over this many bytes live in spill files (None: none)
    spill_dir: str = ""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def describe(self) -> str:
        head = f"{self.what} {'x'.join(map(str, self.shape))}"
        if not self.tile:
            rel = "<=" if self.estimate <= self.budget else ">"
            return f"{head}: untiled (needs ~{_gb(self.estimate)} {rel} budget {_gb(self.budget)}; --tile {self.mode})"
        tiles = sorted({s.tile for s in self.segments if s.kind == "tiles"})
        over = "" if self.fits else " (OVER BUDGET: no cut fits; smallest used)"
        disk = max((s.spilled for s in self.segments), default=0)
        spill = f", up to {_gb(disk)} spilled to {self.spill_dir}" if disk else ""
        return (f"{head}: tiled, {len(self.segments)} segments, tiles {'/'.join(map(str, tiles))} px, "
                f"~{_gb(self.peak)} of budget {_gb(self.budget)}{over} (untiled ~{_gb(self.estimate)}){spill}, "
                f"compute {self.cost_ratio:.2f}x untiled")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


TILE_SIDES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 8)
SPILL_WORTH = 0.8   # spill files are used only when they cut the planned computation by at least a fifth
WORKSPACE = 2.0     # a conv's input and output tiles count this many times: oneDNN reorders, allocator slack


def _side(net: _Net, p: int, tile_px: int, image_hw: tuple) -> int:
    """Tile side at position p for tiles of tile_px image pixels."""
    return max(1, round(tile_px * net.size(p)[0] / image_hw[0]))


def _tile_grid(h: int, w: int, side: int) -> list:
    """Tile cores of at most about side x side covering h x w, edges on multiples of 8 (or of side's largest
    power-of-two divisor below 8) so they fall on whole latent pixels."""
    align = 1
    while align < 8 and side % (2 * align) == 0:
        align *= 2

    def cuts(n):
        k = max(1, math.ceil(n / side))
        edges = sorted({min(n, round(i * n / k / align) * align) for i in range(1, k)} | {0, n})
        return list(zip(edges, edges[1:]))
    return [(y0, y1, x0, x1) for y0, y1 in cuts(h) for x0, x1 in cuts(w)]


def _grid(net: _Net, p: int, tile_px: int, image_hw: tuple) -> list:
    return _tile_grid(*net.size(p), _side(net, p, tile_px, image_hw))


def _tile_bytes(net: _Net, a: int, t: int, tile_px: int, image_hw: tuple) -> int:
    """Working set of one interior tile streamed from a to t: the tensors alive at its most demanding op."""
    h, w = net.size(t)
    side = _side(net, t, tile_px, image_hw)
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    req = _requirements(net, a, t, (y0, min(y0 + side, h), x0, min(x0 + side, w)), True)
    peak, skips = 0.0, []
    for i in range(a, t):
        here = _area(req[i]) * net.shape[i][0] + _area(req[i + 1]) * net.shape[i + 1][0]
        peak = max(peak, sum(skips) + WORKSPACE * here)
        if net.ops[i].kind == "push":
            skips.append(_area(req[i]) * net.shape[i][0])
        elif net.ops[i].kind == "add" and skips:
            skips.pop()
    return int(peak * net.batch * net.esize)


def _pass_cost(net: _Net, a: int, t: int, tile_px: int, image_hw: tuple, keep_skips: bool) -> float:
    """Multiply-adds of one pass a -> t over all tiles, halos included (every tile costed as an interior one)."""
    grid = _grid(net, t, tile_px, image_hw)
    if len(grid) == 1:
        return sum(net.op_cost(i) for i in range(a, t))
    y0, y1, x0, x1 = max(grid, key=_area)
    h, w = net.size(t)
    cy, cx = (h - (y1 - y0)) // 2, (w - (x1 - x0)) // 2     # the largest tile, moved to the middle
    req = _requirements(net, a, t, (cy, cy + y1 - y0, cx, cx + x1 - x0), keep_skips)
    per_tile = 0.0
    for i in range(a, t):
        hi, wi = net.size(i + 1)
        per_tile += net.op_cost(i) * _area(req[i + 1]) / (hi * wi)
    return per_tile * len(grid)


def _untiled_peak(net: _Net) -> int:
    """Peak activation bytes of the plain forward: the input, residuals waiting, each op's input, outputs and
    temporaries."""
    peak = 0.0
    for i, op in enumerate(net.ops):
        (c, h, w), (c2, h2, w2) = net.shape[i], net.shape[i + 1]
        x, y = c * h * w, c2 * h2 * w2
        waiting = net.state_bytes(i) / (net.batch * net.esize) - x
        if op.kind == "norm":
            here = x + 2 * y                     # input, GroupNorm output, SiLU output
        elif op.kind == "attn":
            here = ATTN_WHOLE * x
        elif op.kind == "add":
            here = x + 3 * y                     # branch, residual, shortcut(residual), sum
        elif op.kind in ("conv", "down"):
            here = WORKSPACE * (x + y)
        else:
            here = x + y
        peak = max(peak, waiting + here)
    c0, h0, w0 = net.shape[0]
    return int((peak + c0 * h0 * w0) * net.batch * net.esize)


# What a byte written to / read from a spill file costs, in multiply-adds of computation (planning only).
# Measured on a 2-core CPU: convolutions ~50 G multiply-adds/s; writes ~0.3 GB/s (they reach the disk), reads of
# recently written data ~1 GB/s.
SPILL_WRITE_MACS = 160.0
SPILL_READ_MACS = 50.0


def _spill_io(read: int, written: int, passes: int) -> float:
    """Spill I/O of a segment as multiply-adds: the held tensors read once per pass, the new ones written once."""
    return SPILL_READ_MACS * read * passes + SPILL_WRITE_MACS * written


def _on_disk(net: _Net, p: int, j: int | None, over: int | None) -> bool:
    """Whether a held tensor is spilled to disk when tensors over `over` bytes are (None: none are): the running
    tensor at position p (j None) or the residual pushed at op j. Never the input, the output, or a global
    op's input or output (attention needs them whole in memory)."""
    if over is None:
        return False
    if j is not None:
        return net.shape_bytes(j) > over
    if p == 0 or p == net.n or net.ops[p].kind == "attn" or net.ops[p - 1].kind == "attn":
        return False
    return net.shape_bytes(p) > over


def _plan_segments(net: _Net, budget: int, tile_px: int | None, image_hw: tuple, over: int | None = None,
                   disk: int = 0) -> tuple[list, float, bool]:
    """The cut of positions 0..n into held positions and segments with the least computation whose every
    segment fits the budget (dynamic programming); if none fits, the cut whose largest segment needs least.
    Held tensors over `over` bytes live in spill files (their writes and reads priced as computation), at most
    `disk` bytes at a time. Returns (segments, compute / untiled compute, fits)."""
    n = net.n
    cost = [net.op_cost(i) for i in range(n)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    norms = [i for i, op in enumerate(net.ops) if op.kind == "norm"]
    glob = [i for i, op in enumerate(net.ops) if op.kind == "attn"]
    probe = tile_px or 64           # memory of a segment is judged with tiles of this size
    inp = net.state_bytes(0)
    tile_bytes = net.cache.setdefault(("tile_bytes", probe), {})

    def ends(a, b):
        """(memory, disk, bytes read per pass, bytes written) of the tensors held while streaming a -> b: both
        ends (residuals they share counted once) and the input."""
        mem, spilled, read, written = (inp if a > 0 else 0), 0, 0, 0
        for p, j in [(a, None), (b, None)] + [(a, j) for j in sorted(set(net.alive[a]) | set(net.alive[b]))]:
            nbytes = net.shape_bytes(p if j is None else j)
            if not _on_disk(net, p, j, over):
                mem += nbytes
                continue
            spilled += nbytes
            if p == a and (j is None or j in net.alive[a]):
                read += nbytes
            else:
                written += nbytes
        return mem, spilled, read, written

    def held(a, b):
        return ends(a, b)[0]

    memo = {}

    def segment(a, b):
        """(compute, memory) of a -> b as one segment, or None if it cannot be one."""
        if (a, b) not in memo:
            if any(a <= g < b for g in glob):
                memo[a, b] = None
                if b == a + 1:       # attention on the held tensor: whole, or query chunks (+ K, V, a chunk)
                    x, room = net.shape_bytes(a), budget - held(a, b)
                    extra = (ATTN_WHOLE - 2) * x if _attention_whole(x, room) else 2 * x + x // 8
                    memo[a, b] = cost[a], held(a, b) + extra
            else:
                inside = [k for k in norms if a < k < b]
                mem, spilled, read, written = ends(a, b)
                io = _spill_io(read, written, len(inside) + 1)
                write = 4.0 * net.state_bytes(b) / net.esize   # among equal computations, hold less
                compute = sum(prefix[k] - prefix[a] for k in inside) + prefix[b] - prefix[a] + write + io
                if (a, b) not in tile_bytes:
                    tile_bytes[a, b] = _tile_bytes(net, a, b, probe, image_hw)
                memo[a, b] = (compute, mem + tile_bytes[a, b]) if spilled <= disk else (math.inf, math.inf)
        return memo[a, b]

    def cheapest(limit):
        """best[b] = (compute, previous cut) of the cheapest cut of 0..b whose segments all fit `limit`."""
        best = [(math.inf, 0)] * (n + 1)
        best[0] = (0.0, 0)
        for b in range(1, n + 1):
            for a in range(b - 1, -1, -1):
                seg = segment(a, b)
                if seg is None:
                    break           # a global op lies in a..b: so it does for every smaller a
                if seg[1] <= limit and best[a][0] + seg[0] < best[b][0]:
                    best[b] = (best[a][0] + seg[0], a)
        return best

    best = cheapest(budget)
    fits = best[n][0] < math.inf
    if not fits:   # the least memory any cut needs (its largest segment), then the cheapest cut within it
        floor = [0.0] + [math.inf] * n
        for b in range(1, n + 1):
            for a in range(b - 1, -1, -1):
                seg = segment(a, b)
                if seg is None:
                    break
                floor[b] = min(floor[b], max(floor[a], seg[1]))
        if floor[n] == math.inf:
            return [], math.inf, False
        budget = int(floor[n])
        best = cheapest(budget)
    cuts, b = [], n
    while b:
        a = best[b][1]
        cuts.append((a, b))
        b = a
    segments = []
    for a, b in reversed(cuts):
        c, mem = segment(a, b)
        if net.ops[a].kind == "attn":
            segments.append(Segment(a, b, "global", 0, 1, mem, c, room=budget - held(a, b)))
            continue
        mem, spilled, read, written = ends(a, b)
        tile = tile_px or _pick_tile(net, a, b, image_hw, budget - mem)
        inside = [k for k in norms if a < k < b]
        steps = sum(len(_grid(net, k, tile, image_hw)) for k in inside) + len(_grid(net, b, tile, image_hw))
        c = sum(_pass_cost(net, a, k, tile, image_hw, False) for k in inside)
        c += _pass_cost(net, a, b, tile, image_hw, True)
        c += _spill_io(read, written, len(inside) + 1)
        segments.append(Segment(a, b, "tiles", tile, steps, mem + _tile_bytes(net, a, b, tile, image_hw), c,
                                spilled=spilled))
    return segments, sum(s.cost for s in segments) / (prefix[-1] or 1.0), fits


def _pick_tile(net: _Net, a: int, b: int, image_hw: tuple, room: int) -> int:
    """The largest tile (image pixels) whose working set fits `room`: the whole image if it does."""
    whole = max(image_hw)
    for t in (whole,) + tuple(s for s in TILE_SIDES if s < whole):
        if _tile_bytes(net, a, b, t, image_hw) <= room:
            return t
    return TILE_SIDES[-1]


# --- memory budget and the decision ------------------------------------------------------------------------------

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


# --- running -----------------------------------------------------------------------------------------------------

class _State:
    """A held position: the running tensor and the residuals waiting on the stack ({key: tensor}), whole."""

    def __init__(self, running: torch.Tensor, skips: dict):
        self.running, self.skips = running, skips


class _Runner:
    """Runs a plan's segments, keeping each GroupNorm's statistics once known."""

    def __init__(self, net: _Net, image_hw: tuple, budget: int, progress=None, total: int = 0,
                 spill_over: int | None = None, spill_dir: str = ""):
        self.net, self.image_hw, self.budget = net, image_hw, budget
        self.spill_over, self.spill_dir = spill_over, spill_dir
        self.progress, self.total, self.done = progress, total, 0
        self.stats: dict[int, GroupStats] = {}

    def tick(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def run_tile(self, state: _State, a: int, t: int, core, keep_skips: bool, into: GroupStats | None = None):
        """Region `core` of position t computed from the held state at a; with `into`, only its statistics are
        accumulated there. Returns (running tensor on core, {key: residual on core} for those made after a)."""
        net = self.net
        req = _requirements(net, a, t, core, keep_skips)
        have = req[a]
        ha, wa = net.size(a)
        cur = _crop(state.running, (0, ha, 0, wa), have)
        stack = []
        for j in net.alive[a]:
            _, hj, wj = net.shape[j]
            stack.append((state.skips[j], (0, hj, 0, wj)))
        for i in range(a, t):
            op, out_r = net.ops[i], req[i + 1]
            h, w = net.size(i)
            if op.kind == "push":
                stack.append((cur, have))
                cur = _crop(cur, have, out_r)
            elif op.kind == "add":
                s, s_have = stack.pop()
                sc = _crop(s, s_have, out_r) if op.module is None else \
                    _conv_region(op.module, op.pad, s, s_have, out_r, h, w)
                cur = _crop(cur, have, out_r) + sc
            else:
                cur = _apply_op(op, cur, have, out_r, h, w, self.stats.get(i))
            have = out_r
        if into is not None:
            into.add(cur)
            return None, {}
        new = {j: _crop(s, s_have, core) for j, (s, s_have) in zip(net.alive[t], stack) if j >= a} \
            if keep_skips else {}
        return cur, new

    def stats_pass(self, state: _State, a: int, k: int, tile_px: int) -> GroupStats:
        """The statistics of the GroupNorm at position k: every tile core of k streamed from a, sums kept."""
        acc = GroupStats(self.net.ops[k].module, self.net.batch, state.running.device)
        for core in _grid(self.net, k, tile_px, self.image_hw):
            self.run_tile(state, a, k, core, False, acc)
            self.tick()
        return acc

    def _hold(self, p: int, j: int | None, like: torch.Tensor):
        """An empty whole tensor for position p's running tensor (j None) or residual j: in memory, or in a spill
        file when the plan says so."""
        c, h, w = self.net.shape[p if j is None else j]
        shape = (self.net.batch, c, h, w)
        if _on_disk(self.net, p, j, self.spill_over):
            return SpilledTensor(shape, like.dtype, like.device, self.spill_dir)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def final_pass(self, state: _State, a: int, b: int, tile_px: int) -> _State:
        """The held state at b, tile by tile from the held state at a (with the statistics of a GroupNorm at b,
        summed from the same tiles)."""
        net = self.net
        grid = _grid(net, b, tile_px, self.image_hw)
        kept = {j: state.skips[j] for j in net.alive[b] if j < a}   # residuals held since before a
        new_keys = [j for j in net.alive[b] if j >= a]
        norm = net.ops[b].module if b < net.n and net.ops[b].kind == "norm" and b not in self.stats else None
        acc = GroupStats(norm, net.batch, None) if norm is not None else None
        spills = any(_on_disk(net, b, j, self.spill_over) for j in [None] + new_keys)
        if len(grid) == 1 and not spills:   # one tile is the whole image: keep its tensors as they come, no copies
            out, new = self.run_tile(state, a, b, grid[0], True)
            if acc is not None:
                self.stats[b] = acc.add(out)
            self.tick()
            return _State(out, {**kept, **new})
        running, new_skips = None, {}
        for core in grid:
            out, new = self.run_tile(state, a, b, core, True)
            if running is None:    # dtypes from the first tile: under autocast they are not the input's
                running = self._hold(b, None, out)
                new_skips = {j: self._hold(b, j, t) for j, t in new.items()}
            running[:, :, core[0]:core[1], core[2]:core[3]] = out
            for j, t in new.items():
                new_skips[j][:, :, core[0]:core[1], core[2]:core[3]] = t
            if acc is not None:
                acc.add(out)
            del out, new
            self.tick()
        if acc is not None:
            self.stats[b] = acc
        return _State(running, {**kept, **new_skips})

    def segment(self, state: _State, seg: Segment) -> _State:
        net, a, b = self.net, seg.a, seg.b
        if seg.kind == "global":    # its input is never spilled (_on_disk)
            out = _global_attention(net.ops[a].module, state.running, seg.room)
            self.tick()
            return _State(out, state.skips)
        if net.ops[a].kind == "norm" and a not in self.stats:
            self.stats[a] = GroupStats.of(net.ops[a].module, state.running)
        for k in range(a + 1, b):  # each GroupNorm inside, with every earlier statistic already exact
            if net.ops[k].kind == "norm":
                self.stats[k] = self.stats_pass(state, a, k, seg.tile)
        return self.final_pass(state, a, b, seg.tile)


# --- public entry points -----------------------------------------------------------------------------------------

def _execute(vae: AutoencoderKL, x: torch.Tensor, what: str, tile_plan: TilePlan, progress, report) -> torch.Tensor:
    if tuple(x.shape) != tuple(tile_plan.shape) or tile_plan.what != what:
        raise UsageError(f"tiling: the plan is for {tile_plan.what} {tile_plan.shape}, not {what} {tuple(x.shape)}")
    if not tile_plan.segments:
        raise UsageError("tiling: this plan does not tile (plan(..., mode='on') makes one that does)")
    if vae.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in vae.modules()):
        raise UsageError("tiling: inference only, and this model would apply dropout: call vae.eval()")
    start = time.perf_counter()
    net = _net(vae, x.shape, what, None)
    image_hw = net.size(0) if what == "encode" else net.size(net.n)
    runner = _Runner(net, image_hw, tile_plan.budget, progress, tile_plan.steps, tile_plan.spill_over,
                     tile_plan.spill_dir)
    state = _State(x, {})
    for seg in tile_plan.segments:
        state = runner.segment(state, seg)
    if report is not None:
        report.update(plan=tile_plan.describe(), tiled=True, steps=runner.done,
                      seconds=time.perf_counter() - start)
    return state.running


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
