"""Tiled encode and decode: any image size in bounded memory, with the same result as untiled.

Why tiles seam elsewhere, and why these do not
----------------------------------------------
Common tiled VAEs (diffusers' enable_tiling, ComfyUI, the A1111 extension) run each tile through the
network on its own. Every GroupNorm then normalises with that tile's statistics, and the mid-block
attention sees only the tile, so neighbouring tiles differ in tone and contrast: the seams are blended or
averaged away, never removed. Here the network is treated as what it is: a chain of *local* operations
(3x3 and 1x1 convolutions, nearest upsampling, the stride-2 downsampling, SiLU, residual additions) and
two *global* ones, GroupNorm (a per-group mean and variance over the whole image) and attention.

- **Local operations** are computed tile by tile, each tile with exactly the halo its receptive field
  needs. The halo is not a guessed margin: for every tile the region each layer must produce is derived
  backwards from the region wanted at the end (3x3 conv: one more pixel each side; downsample: rows
  2a .. 2b of its padded input; nearest upsample: rows a//2 .. ceil(b/2)), clipped at the image border,
  where the zero padding of the untiled convolution is reproduced exactly. Each layer then computes
  exactly its region ("valid" convolutions on real neighbours), so every output pixel sees the same
  numbers in the same positions as untiled: sizes, odd shapes, border tiles and the asymmetric pad of
  the downsample all come out identical by construction, for any tile size.
- **GroupNorm** is applied with the statistics of the whole image. They are accumulated over a partition
  of the image into tile cores as per-group sums and sums of squares in float64 (mean = S1/n, var =
  S2/n - mean^2: the exact biased variance GroupNorm uses, not an average of per-tile variances).
- **Attention** (the mid block, at 1/8 resolution) runs over the whole latent, untiled, in query chunks
  when the whole N x N problem would not fit (each query attends to every key: chunking queries is exact).

Memory: materialise what fits, recompute what does not
------------------------------------------------------
The network is cut at *boundaries* (positions between layers). At a materialised boundary the whole
activation (plus any residual still waiting to be added) is held in memory; between two materialised
boundaries a *segment* is streamed tile by tile. A GroupNorm right at a segment's start gets its statistics
from the held tensor; one inside a segment needs them from a pass over the whole image: tiles are run from
the segment's start up to that GroupNorm with every earlier statistic already frozen (exact, but each such
pass recomputes the segment's prefix). A planner (dynamic programming over boundaries) chooses the cuts
with the least computation whose held tensors fit the memory budget: with room, every GroupNorm input is
held and the cost is one forward pass plus the 1-pixel halos; at 4096 x 4096 the full-resolution layers
cannot be held (one 128-channel fp32 activation is 8.6 GB), so they are streamed.

When exact statistics would cost more than `max_cost` forward passes, they are *estimated* inside a streamed
segment instead (stats="estimate" or "auto"): a first guess comes from running the segment on its input
downscaled 2x (cheap, and through this same machinery); then `refine` passes over the full image each
recompute every statistic of the segment with the previous guesses frozen (the statistics form a
triangular system, so pass k makes the first k GroupNorms exact and the rest converge); the last pass
produces the output and measures how far the statistics it used are from the ones it saw
(`report["stats_residual"]`, relative to each group's standard deviation).

Dependencies point down: this module uses the model's own modules and weights; it never prints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .modules.attention import AttnBlock, LinAttnBlock, NoAttn
from .modules.autoencoder import AutoencoderKL, DiagonalGaussian
from .modules.blocks import Downsample, ResnetBlock, Upsample

MODES = ("auto", "on", "off")
STATS = ("auto", "exact", "estimate")

Region = tuple  # (y0, y1, x0, x1), half-open, at one position's resolution


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
    (C, H, W) and the residuals waiting on the stack (keys: the index of the push op that made them, or a
    negative key for residuals already waiting when the op list starts: `held`, {key: (C, H, W)})."""

    def __init__(self, ops: list[Op], in_shape: tuple, batch: int, esize: int, held: dict | None = None):
        self.ops, self.batch, self.esize = ops, batch, esize
        self.held = dict(held or {})
        c, h, w = in_shape
        self.shape, self.alive = [], []
        stack: list[int] = sorted(self.held)
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

    def shape_of(self, j: int) -> tuple:
        """(C, H, W) of the residual with key j."""
        return self.held[j] if j < 0 else self.shape[j]

    def size(self, p: int) -> tuple[int, int]:
        return self.shape[p][1:]

    def state_bytes(self, p: int, skip_set=None) -> int:
        """Bytes held at a materialised position p: the running tensor and the residuals on the stack."""
        c, h, w = self.shape[p]
        total = c * h * w
        for j in (self.alive[p] if skip_set is None else skip_set):
            cj, hj, wj = self.shape_of(j)
            total += cj * hj * wj
        return total * self.batch * self.esize

    def op_cost(self, i: int) -> float:
        """Multiply-adds of op i over the whole image (pointwise work counted at ~64 MAC per element)."""
        op, (c, h, w), (c2, h2, w2) = self.ops[i], self.shape[i], self.shape[i + 1]
        b = self.batch
        if op.kind in ("conv", "down"):
            k = op.module.kernel_size[0]
            return b * c * c2 * k * k * h2 * w2 + 8.0 * b * c2 * h2 * w2
        if op.kind == "add":
            extra = c2 * c2 * (2 * op.pad + 1) ** 2 if op.module is not None else 0
            return b * (extra + 8.0 * c2) * h2 * w2
        if op.kind == "attn":
            return b * (2.0 * (h * w) ** 2 * c + 4.0 * c * c * h * w)
        return 64.0 * b * c2 * h2 * w2 if op.kind == "norm" else 8.0 * b * c2 * h2 * w2


# --- regions -----------------------------------------------------------------------------------------------------

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
    """The part `want` of a tensor that covers region `have` (both at the same resolution)."""
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


def _requirements(net: _Net, a: int, t: int, out_r, keep_skips: bool, cores: dict) -> list:
    """Regions of the running tensor needed at positions a..t so that position t is known on out_r (and, with
    keep_skips, the residuals pushed inside the segment too), and every position in `cores` covers its core."""
    req = [None] * (t + 1)
    sk = [out_r if (keep_skips and j >= a) else None for j in net.alive[t]]
    r = _hull(out_r, cores.get(t))
    req[t] = r
    for i in range(t - 1, a - 1, -1):
        op = net.ops[i]
        h, w = net.size(i)
        if op.kind == "add":        # forward pops a residual and adds shortcut(residual): it needs r grown
            sk.append(_grow(r, op.pad, h, w))
        elif op.kind == "push":     # forward saves the running tensor: it must also cover the residual's need
            r = _hull(r, sk.pop())
        else:
            r = _needed(op, r, h, w)
        r = _hull(r, cores.get(i))
        req[i] = r
    return req


def _take(t: torch.Tensor, have, need, h: int, w: int) -> torch.Tensor:
    """Rows/cols `need` (may reach outside [0, h) x [0, w)) of a tensor covering `have`, zeros outside."""
    clip = (max(need[0], 0), min(need[1], h), max(need[2], 0), min(need[3], w))
    x = _crop(t, have, clip)
    pads = (clip[2] - need[2], need[3] - clip[3], clip[0] - need[0], need[1] - clip[1])
    return F.pad(x, pads) if any(pads) else x


def _conv_region(m: nn.Conv2d, pad: int, t: torch.Tensor, have, out_r, h: int, w: int) -> torch.Tensor:
    """Region out_r of a stride-1 'same' conv. The conv's own zero padding serves the image border; on the other
    sides the input reaches `pad` further, and the outputs that the padding spoilt there are cropped away."""
    clip = _grow(out_r, pad, h, w)
    y = F.conv2d(_crop(t, have, clip), m.weight, m.bias, padding=pad)
    return y if clip == out_r else _crop(y, clip, out_r)


def _apply_op(op: Op, cur: torch.Tensor, have, out_r, h: int, w: int, stats) -> torch.Tensor:
    """Op on a tile: `cur` covers `have` at the op's input resolution (h, w); returns region out_r of its output."""
    if op.kind == "conv":
        return _conv_region(op.module, op.pad, cur, have, out_r, h, w)
    if op.kind == "down":
        x = _take(cur, have, (2 * out_r[0], 2 * out_r[1] + 1, 2 * out_r[2], 2 * out_r[3] + 1), h, w)
        return F.conv2d(x, op.module.weight, op.module.bias, stride=2)
    if op.kind == "pool":
        return F.avg_pool2d(_crop(cur, have, (2 * out_r[0], 2 * out_r[1], 2 * out_r[2], 2 * out_r[3])), 2, 2)
    if op.kind == "up":
        src = _needed(op, out_r, h, w)
        x = F.interpolate(_crop(cur, have, src), scale_factor=2.0, mode="nearest")
        return _crop(x, (2 * src[0], 2 * src[1], 2 * src[2], 2 * src[3]), out_r)
    if op.kind == "norm":
        return stats.apply(_crop(cur, have, out_r), op.act)
    if op.kind == "tanh":
        return torch.tanh(_crop(cur, have, out_r))
    raise AssertionError(op.kind)


# --- GroupNorm statistics ----------------------------------------------------------------------------------------

class GroupStats:
    """Per-(sample, group) count, sum and sum of squares of a GroupNorm's input over tile cores, and the GroupNorm
    they define (biased variance, the module's eps and affine weights).

    The sums are kept in float64 in their numerically stable form, count n, mean m = S1/n and M2 = S2 - n m^2
    (the sum of squared deviations): each tile's (n_t, m_t, M2_t) comes from one var_mean over the tile
    core, and tiles are combined exactly (Chan et al.): the result is the whole image's mean and biased
    variance, not an average of per-tile variances."""

    def __init__(self, module: nn.GroupNorm, batch: int, device):
        self.module = module
        self.groups = module.num_groups
        self.n = 0
        self.mean = torch.zeros(batch, self.groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self._affine = None

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        xg = x.unflatten(1, (self.groups, -1))            # (B, G, C/G, h, w): a view, no copy
        if xg.dtype not in (torch.float32, torch.float64):
            xg = xg.float()
        var_t, mean_t = torch.var_mean(xg, dim=(2, 3, 4), correction=0)
        n_t = xg[0, 0].numel()
        n = self.n + n_t
        delta = mean_t.double() - self.mean
        self.mean += delta * (n_t / n)
        self.m2 += var_t.double() * n_t + delta * delta * (self.n * n_t / n)
        self.n = n
        self._affine = None

    @classmethod
    def of(cls, module: nn.GroupNorm, x: torch.Tensor, rows: int = 64) -> "GroupStats":
        """Statistics of a whole held tensor, read in bands of rows (no full-size temporaries)."""
        s = cls(module, x.shape[0], x.device)
        for y in range(0, x.shape[2], rows):
            s.add(x[:, :, y:y + rows])
        return s

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, torch.sqrt(self.m2 / self.n + self.module.eps)

    def apply(self, x: torch.Tensor, act: bool) -> torch.Tensor:
        """GroupNorm of x with these statistics (x * a + b per channel, as torch's kernel computes it), SiLU."""
        if self._affine is None or self._affine[0].dtype != x.dtype or self._affine[0].device != x.device:
            mean, std = self.mean_std()
            c = x.shape[1]
            per = c // self.groups
            scale = (1.0 / std).repeat_interleave(per, dim=1) * self.module.weight.double()[None]
            shift = self.module.bias.double()[None] - mean.repeat_interleave(per, dim=1) * scale
            dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            self._affine = (scale.to(dt)[:, :, None, None], shift.to(dt)[:, :, None, None])
        scale, shift = self._affine
        y = torch.addcmul(shift, x, scale)
        if act:
            y = F.silu(y, inplace=True)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def distance(self, other: "GroupStats") -> float:
        """Largest difference in mean or std between two estimates, relative to the group's std."""
        m1, s1 = self.mean_std()
        m2, s2 = other.mean_std()
        return float(torch.maximum((m1 - m2).abs() / s2, (s1 - s2).abs() / s2).max())


# --- attention over the whole latent -----------------------------------------------------------------------------

def _global_attention(block: nn.Module, x: torch.Tensor, budget: int) -> torch.Tensor:
    """The attention block on a held tensor: whole when it fits, else the same computation in query chunks."""
    b, c, h, w = x.shape
    n = h * w
    whole = 6 * x.numel() * x.element_size()
    if type(block) is not AttnBlock or whole <= budget:
        return block(x)
    stats = GroupStats.of(block.norm, x)

    def project(conv, rows):  # as AttnBlock does it: a 1x1 conv as a linear map on (B, N, C) tokens
        tokens = stats.apply(x[:, :, rows], act=False).flatten(2).transpose(1, 2)
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)   # (B, rows*W, C), C contiguous

    rows_per = max(1, min(h, (4 << 20) // max(w, 1) // max(c, 1)))
    k = torch.empty(b, n, c, dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    for y0 in range(0, h, rows_per):
        sl = slice(y0 * w, min(y0 + rows_per, h) * w)
        k[:, sl] = project(block.k, slice(y0, y0 + rows_per))
        v[:, sl] = project(block.v, slice(y0, y0 + rows_per))
    out = torch.empty_like(x)
    q_rows = max(1, min(h, (budget - 3 * x.numel() * x.element_size()) // max(1, 8 * b * w * c * x.element_size())))
    for y0 in range(0, h, q_rows):
        rows = slice(y0, min(y0 + q_rows, h))
        q = project(block.q, rows)
        o = block.attend(q, k, v)                        # (B, rows*W, C)
        o = F.linear(o, block.proj_out.weight.flatten(1), block.proj_out.bias)
        out[:, :, rows] = x[:, :, rows] + o.transpose(1, 2).reshape(b, c, rows.stop - rows.start, w)
    return out


# --- planning ----------------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """Positions a..b of the op list: a and b are held whole; in between, tiles stream."""

    a: int
    b: int
    kind: str                 # "tiles" | "global"
    stats: str = "exact"      # tiles: how GroupNorms inside are normalised: exact | estimate
    tile: int = 0             # tile side in image pixels
    memory: int = 0           # predicted bytes held (both ends) + one tile's working set
    cost: float = 0.0         # multiply-adds, recomputation included


@dataclass
class TilePlan:
    """How one call will run: whether it tiles, and if so the segments. `estimate` and `budget` in bytes."""

    what: str
    shape: tuple
    tile: bool
    mode: str
    estimate: int
    budget: int
    segments: list = field(default_factory=list)
    peak: int = 0             # predicted activation bytes (largest segment)
    cost_ratio: float = 1.0   # predicted compute / untiled compute

    def describe(self) -> str:
        if not self.tile:
            return (f"{self.what} {self.shape}: untiled (estimate {_gb(self.estimate)} "
                    f"{'<=' if self.estimate <= self.budget else '>'} budget {_gb(self.budget)}, mode {self.mode})")
        n_tiles = sum(s.kind == "tiles" for s in self.segments)
        est = sum(s.stats == "estimate" for s in self.segments if s.kind == "tiles")
        return (f"{self.what} {self.shape}: tiled in {len(self.segments)} segments ({n_tiles} streamed, {est} with "
                f"estimated statistics), predicted peak {_gb(self.peak)} of budget {_gb(self.budget)}, "
                f"compute {self.cost_ratio:.2f}x untiled (untiled estimate {_gb(self.estimate)})")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


TILE_CANDIDATES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 16, 8)
WORKSPACE = 2.0    # live tile tensors x this: im2col/oneDNN reorders and allocator slack


def _scale(net: _Net, p: int, image_hw: tuple) -> float:
    """Image pixels per pixel of position p."""
    return image_hw[0] / net.size(p)[0]


def _tile_grid(h: int, w: int, t: int, align: int = 1) -> list:
    """Tile cores of about t x t covering h x w, edges at multiples of `align` where possible."""
    def cuts(n):
        k = max(1, math.ceil(n / max(t, 1)))
        edges = sorted({min(n, round(i * n / k / align) * align) for i in range(k)} | {n})
        edges[0] = 0
        return [(e0, e1) for e0, e1 in zip(edges, edges[1:]) if e1 > e0]
    return [(y0, y1, x0, x1) for y0, y1 in cuts(h) for x0, x1 in cuts(w)]


def _map_core(core, hw_from, hw_to):
    """A tile core at one resolution mapped onto another; tiles of a grid map onto a partition."""
    (h0, w0), (h1, w1) = hw_from, hw_to

    def edge(v, n0, n1):
        return n1 if v >= n0 else v * n1 // n0
    r = (edge(core[0], h0, h1), edge(core[1], h0, h1), edge(core[2], w0, w1), edge(core[3], w0, w1))
    return r if _area(r) > 0 else None


def _tile_bytes(net: _Net, a: int, t: int, tile_px: int, image_hw: tuple, keep_skips: bool) -> int:
    """Working set of one interior tile of the segment a -> t (the tensors alive at the largest op)."""
    h, w = net.size(t)
    side = max(1, round(tile_px / _scale(net, t, image_hw)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    core = (max(y0, 0), min(max(y0, 0) + side, h), max(x0, 0), min(max(x0, 0) + side, w))
    req = _requirements(net, a, t, core, keep_skips, {})
    b, e = net.batch, net.esize
    peak, skips = 0, []
    for i in range(a, t):
        op = net.ops[i]
        cin, cout = net.shape[i][0], net.shape[i + 1][0]
        live = sum(skips)
        here = _area(req[i]) * cin + _area(req[i + 1]) * cout
        peak = max(peak, live + WORKSPACE * here)
        if op.kind == "push":
            skips.append(_area(req[i]) * cin)
        elif op.kind == "add" and skips:
            skips.pop()
    return int(peak * b * e)


def _untiled_peak(net: _Net) -> int:
    """Peak activation bytes of the plain forward: held tensors + each op's input, output and temporaries."""
    peak = 0
    b, e = net.batch, net.esize
    for i, op in enumerate(net.ops):
        (c, h, w), (c2, h2, w2) = net.shape[i], net.shape[i + 1]
        held = net.state_bytes(i) // (b * e) - c * h * w
        x, y = c * h * w, c2 * h2 * w2
        if op.kind == "norm":
            here = x + 2 * y                     # input, norm output, SiLU output
        elif op.kind == "attn":
            here = 7 * x                         # x, norm, q, k, v, attention output, projection
        elif op.kind == "add":
            here = x + 3 * y                     # h, residual, shortcut(residual), sum
        elif op.kind in ("conv", "down"):
            here = WORKSPACE * (x + y)
        else:
            here = x + y
        peak = max(peak, held + here)
    return int((peak + net.shape[0][0] * net.shape[0][1] * net.shape[0][2]) * b * e)


def _plan_segments(net: _Net, budget: int, tile_px: int | None, image_hw: tuple, stats: str,
                   max_cost: float) -> tuple[list, float]:
    """Cheapest cut of positions 0..n into held boundaries and streamed segments within the budget
    (dynamic programming over positions); when nothing fits, the cut whose largest segment needs least."""
    n = net.n
    cost = [net.op_cost(i) for i in range(n)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    forward = prefix[-1] or 1.0
    norms = [i for i, op in enumerate(net.ops) if op.kind == "norm"]
    glob = [i for i, op in enumerate(net.ops) if op.kind == "attn"]
    inp = net.state_bytes(0)
    probe_tile = tile_px or 64

    def held(a, b):
        """Bytes held while streaming a -> b: both ends (residuals shared by both counted once), the input."""
        c2, h2, w2 = net.shape[b]
        byt = net.state_bytes(a, set(net.alive[a]) | set(net.alive[b])) + c2 * h2 * w2 * net.batch * net.esize
        return byt + (inp if a > 0 else 0)

    memo = {}

    def segment(a, b, allow_estimate):
        """(cost, memory, stats) of running a -> b as one segment, or None if it cannot be one."""
        key = (a, b, allow_estimate)
        if key in memo:
            return memo[key]
        if any(a <= g < b for g in glob):
            if b != a + 1 or net.ops[a].kind != "attn":
                out = None
            else:
                out = cost[a], held(a, b) + 3 * net.state_bytes(a), "exact"
        else:
            mem = held(a, b) + _tile_bytes(net, a, b, probe_tile, image_hw, keep_skips=True)
            inside = [k for k in norms if a < k < b]
            # + writing the held end once: among equal computations, fewer and smaller held tensors win
            write = 4.0 * net.state_bytes(b) / net.esize
            out = sum(prefix[k] - prefix[a] for k in inside) + prefix[b] - prefix[a] + write, mem, "exact"
            if allow_estimate and len(inside) > 1:
                est = (1.5 + REFINE) * (prefix[b] - prefix[a]) + write
                if est < out[0]:
                    out = est, mem, "estimate"
        memo[key] = out
        return out

    def solve(allow_estimate):
        best = [(math.inf, 0, None)] * (n + 1)        # (cost, largest memory, previous cut)
        least = [(math.inf, math.inf, None)] * (n + 1)  # (largest memory, cost, previous cut)
        best[0] = (0.0, 0, None)
        least[0] = (0, 0.0, None)
        for b in range(1, n + 1):
            for a in range(b - 1, -1, -1):
                seg = segment(a, b, allow_estimate)
                if seg is None:
                    if any(a <= g < b for g in glob):
                        break
                    continue
                c, mem, _ = seg
                if mem <= budget and best[a][0] + c < best[b][0]:
                    best[b] = (best[a][0] + c, max(best[a][1], mem), a)
                cand = (max(least[a][0], mem), least[a][1] + c, a)
                if cand[:2] < least[b][:2]:
                    least[b] = cand
        fits = best[n][0] < math.inf
        table = best if fits else least
        cuts, b = [], n
        while b != 0:
            a = table[b][2]
            cuts.append((a, b))
            b = a
        total = best[n][0] if fits else least[n][1]
        return list(reversed(cuts)), total

    allow = stats == "estimate"
    cuts, total = solve(allow)
    if stats == "auto" and total > max_cost * forward:
        cuts2, total2 = solve(True)
        if total2 < total:
            allow, cuts, total = True, cuts2, total2
    segments = []
    for a, b in cuts:
        c, mem, how = segment(a, b, allow)
        kind = "global" if net.ops[a].kind == "attn" and b == a + 1 else "tiles"
        seg = Segment(a, b, kind, how, 0, mem, c)
        if kind == "tiles":
            seg.tile = tile_px or _pick_tile(net, a, b, image_hw, budget - held(a, b))
            seg.memory = held(a, b) + _tile_bytes(net, a, b, seg.tile, image_hw, keep_skips=True)
        segments.append(seg)
    return segments, total / forward


REFINE = 1          # full-resolution refinement passes of estimated statistics (see the module docstring)


def _pick_tile(net: _Net, a: int, b: int, image_hw: tuple, room: int) -> int:
    """The largest candidate tile (image pixels) whose working set fits `room`; whole image if it fits."""
    biggest = max(image_hw)
    for t in (biggest,) + tuple(c for c in TILE_CANDIDATES if c < biggest):
        if _tile_bytes(net, a, b, t, image_hw, keep_skips=True) <= room:
            return t
    return TILE_CANDIDATES[-1]


# --- memory budget -----------------------------------------------------------------------------------------------

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
    """Bytes the activations may use: 75% of free RAM (MemAvailable), or of free + cached GPU memory on CUDA."""
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
    """Predicted peak activation bytes (weights not included) of the untiled vae.encode / vae.decode of `shape`
    (the input's shape: image for encode, latent for decode)."""
    return _untiled_peak(_net(vae, shape, what, dtype))


def should_tile(mode: str, estimate: int, budget: int) -> bool:
    """on: always; off: never; auto: exactly when the estimate exceeds the budget."""
    if mode not in MODES:
        raise UsageError(f"--tile {mode!r}: choose one of {', '.join(MODES)}")
    return mode == "on" or (mode == "auto" and estimate > budget)


def plan(vae: AutoencoderKL, shape: tuple, what: str, *, mode: str = "auto", budget: int | None = None,
         tile_size: int | None = None, dtype: torch.dtype | None = None, stats: str = "auto",
         max_cost: float = 3.0) -> TilePlan:
    """Decide whether (and how) to tile encoding/decoding an input of `shape` within `budget` bytes."""
    if stats not in STATS:
        raise UsageError(f"tiling: stats={stats!r}; choose one of {', '.join(STATS)}")
    if tile_size is not None and tile_size < 1:
        raise UsageError(f"--tile-size {tile_size}: must be a positive number of pixels")
    net = _net(vae, shape, what, dtype)
    device = next(vae.parameters()).device
    budget = default_budget(device) if budget is None else int(budget)
    estimate = _untiled_peak(net)
    p = TilePlan(what, tuple(shape), should_tile(mode, estimate, budget), mode, estimate, budget)
    if p.tile:
        image_hw = net.size(0) if what == "encode" else net.size(net.n)
        p.segments, p.cost_ratio = _plan_segments(net, budget, tile_size, image_hw, stats, max_cost)
        p.peak = max(s.memory for s in p.segments)
    return p


# --- running -----------------------------------------------------------------------------------------------------

class _State:
    """A held position: the running tensor and the residuals on the stack (by push index), whole."""

    def __init__(self, running: torch.Tensor, skips: dict):
        self.running, self.skips = running, skips


class _Runner:
    def __init__(self, net: _Net, image_hw: tuple, budget: int, progress=None):
        self.net, self.image_hw, self.budget, self.progress = net, image_hw, budget, progress
        self.stats: dict[int, GroupStats] = {}
        self.residual = 0.0
        self.done = 0

    def tick(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done)

    def grid(self, p: int, tile_px: int) -> list:
        h, w = self.net.size(p)
        side = max(1, round(tile_px / _scale(self.net, p, self.image_hw)))
        align = 1
        while align * 2 <= min(8, side) and side % (align * 2) == 0:
            align *= 2
        return _tile_grid(h, w, side, align)

    def run_tile(self, state: _State, a: int, t: int, core, keep_skips: bool, accum: dict, stats: dict):
        """Tile `core` of position t computed from the held state at a, accumulating GroupNorm inputs at the
        positions in `accum` ({position: (tile cores at that position's resolution, GroupStats)})."""
        net = self.net
        cores = {p: c for p, (c, _) in accum.items() if c is not None}
        req = _requirements(net, a, t, core, keep_skips, cores)
        have = req[a]
        ha, wa = net.size(a)
        cur = _crop(state.running, (0, ha, 0, wa), have)
        stack = [(state.skips[j], (0, net.shape_of(j)[1], 0, net.shape_of(j)[2])) for j in net.alive[a]]
        for i in range(a, t):
            op = net.ops[i]
            h, w = net.size(i)
            out_r = req[i + 1]
            if i in accum and accum[i][0] is not None:
                accum[i][1].add(_crop(cur, have, accum[i][0]))
            if op.kind == "push":
                stack.append((cur, have))
                cur = _crop(cur, have, out_r)
            elif op.kind == "add":
                s, s_have = stack.pop()
                if op.module is None:
                    sc = _crop(s, s_have, out_r)
                else:
                    sc = _conv_region(op.module, op.pad, s, s_have, out_r, h, w)
                cur = _crop(cur, have, out_r) + sc
            else:
                cur = _apply_op(op, cur, have, out_r, h, w, stats.get(i))
            have = out_r
        if t in accum and accum[t][0] is not None:
            accum[t][1].add(_crop(cur, have, accum[t][0]))
        out = _crop(cur, have, core)
        skips = {}
        if keep_skips:
            for j, (s, s_have) in zip(net.alive[t], stack):
                if j >= a:
                    skips[j] = _crop(s, s_have, core)
        return out, skips

    def stats_pass(self, state: _State, a: int, targets: list, tile_px: int, stats: dict) -> dict:
        """One pass over the image from held position a, returning the GroupStats of every target position
        (accumulated over tile cores), with `stats` frozen for the GroupNorms it runs through."""
        net = self.net
        t = max(targets)
        acc = {k: GroupStats(net.ops[k].module, net.batch, state.running.device) for k in targets}
        for core in self.grid(t, tile_px):
            accum = {k: (_map_core(core, net.size(t), net.size(k)), acc[k]) for k in targets}
            self.run_tile(state, a, t, core, False, accum, stats)
            self.tick()
        return acc

    def final_pass(self, state: _State, a: int, b: int, tile_px: int, stats: dict, accum_positions=()) -> tuple:
        """The held state at b, tile by tile from the held state at a (and GroupStats at `accum_positions`)."""
        net = self.net
        ref = state.running
        acc = {k: GroupStats(net.ops[k].module, net.batch, ref.device) for k in accum_positions}
        grid = self.grid(b, tile_px)
        kept = {j: state.skips[j] for j in net.alive[b] if j < a}   # residuals held since before a
        if len(grid) == 1:   # one tile is the whole image: keep its tensors as they come, no copies
            accum = {k: (_map_core(grid[0], net.size(b), net.size(k)), acc[k]) for k in accum_positions}
            out, new = self.run_tile(state, a, b, grid[0], True, accum, stats)
            self.tick()
            return _State(out, {**kept, **new}), acc

        def empty(shape):
            return torch.empty(net.batch, *shape, dtype=ref.dtype, device=ref.device)
        running = empty(net.shape[b])
        new_skips = {j: empty(net.shape_of(j)) for j in net.alive[b] if j >= a}
        for core in grid:
            accum = {k: (_map_core(core, net.size(b), net.size(k)), acc[k]) for k in accum_positions}
            out, new = self.run_tile(state, a, b, core, True, accum, stats)
            running[:, :, core[0]:core[1], core[2]:core[3]] = out
            for j, t in new.items():
                new_skips[j][:, :, core[0]:core[1], core[2]:core[3]] = t
            del out, new
            self.tick()
        return _State(running, {**kept, **new_skips}), acc

    def segment(self, state: _State, seg: Segment) -> _State:
        net, a, b = self.net, seg.a, seg.b
        if seg.kind == "global":
            out = _global_attention(net.ops[a].module, state.running, self.budget)
            self.tick()
            return _State(out, state.skips)
        if net.ops[a].kind == "norm" and a not in self.stats:
            self.stats[a] = GroupStats.of(net.ops[a].module, state.running)
        inside = [k for k in range(a + 1, b) if net.ops[k].kind == "norm"]
        if seg.stats == "exact":
            for k in inside:   # each GroupNorm's statistics with every earlier one already exact
                self.stats[k] = self.stats_pass(state, a, [k], seg.tile, self.stats)[k]
            new, _ = self.final_pass(state, a, b, seg.tile, self.stats)
            return new
        # estimated: a guess from the segment run on its input downscaled 2x, then refinement passes
        guess = self.downscaled_guess(state, seg, inside)
        self.stats.update(guess)
        for _ in range(REFINE):
            self.stats.update(self.stats_pass(state, a, inside, seg.tile, self.stats))
        new, seen = self.final_pass(state, a, b, seg.tile, self.stats, inside)
        for k in inside:
            self.residual = max(self.residual, self.stats[k].distance(seen[k]))
        return new

    def downscaled_guess(self, state: _State, seg: Segment, inside: list) -> dict:
        """Statistics of the segment's GroupNorms from its input downscaled 2x (area), run by the same planner."""
        net, a, b = self.net, seg.a, seg.b

        def small(x):
            return F.avg_pool2d(x, 2, 2, ceil_mode=True)
        keys = {j: -(len(net.alive[a]) - i) for i, j in enumerate(net.alive[a])}
        run0 = small(state.running)
        skips = {keys[j]: small(state.skips[j]) for j in net.alive[a]}
        held = {k: tuple(t.shape[1:]) for k, t in skips.items()}
        sub = _Net(net.ops[a:b], tuple(run0.shape[1:]), net.batch, net.esize, held)
        image_hw = (max(1, self.image_hw[0] // 2), max(1, self.image_hw[1] // 2))
        segments, _ = _plan_segments(sub, self.budget, max(1, seg.tile // 2), image_hw, "auto", 3.0)
        runner = _Runner(sub, image_hw, self.budget)
        st = _State(run0, skips)
        for s in segments:
            st = runner.segment(st, s)
        return {k: runner.stats[k - a] for k in inside}


# --- public entry points -----------------------------------------------------------------------------------------

def _execute(vae: AutoencoderKL, x: torch.Tensor, what: str, tile_plan: TilePlan, progress, report) -> torch.Tensor:
    if tuple(x.shape) != tuple(tile_plan.shape) or tile_plan.what != what:
        raise UsageError(f"tiling: the plan is for {tile_plan.what} {tile_plan.shape}, not {what} {tuple(x.shape)}")
    net = _net(vae, x.shape, what, None)
    image_hw = net.size(0) if what == "encode" else net.size(net.n)
    runner = _Runner(net, image_hw, tile_plan.budget, progress)
    state = _State(x, {})
    for seg in tile_plan.segments:
        state = runner.segment(state, seg)
    if report is not None:
        report.update(plan=tile_plan.describe(), segments=len(tile_plan.segments), steps=runner.done,
                      stats_residual=runner.residual,
                      estimated=any(s.stats == "estimate" for s in tile_plan.segments if s.kind == "tiles"))
    return state.running


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, *, tile_size: int | None = None, budget: int | None = None,
                 stats: str = "auto", tile_plan: TilePlan | None = None, return_moments: bool = False,
                 progress=None, report: dict | None = None):
    """vae.encode(x) computed in tiles: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian (or the moments).

    tile_size: tile side in image pixels (None: the largest that fits `budget`); budget: bytes for
    activations (None: default_budget); stats: auto | exact | estimate (see the module docstring);
    progress: called with the number of tile steps done; report: a dict filled with what happened."""
    tile_plan = tile_plan or plan(vae, tuple(x.shape), "encode", mode="on", budget=budget, tile_size=tile_size,
                                  stats=stats)
    moments = _execute(vae, x, "encode", tile_plan, progress, report)
    return moments if return_moments else DiagonalGaussian(moments)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile_size: int | None = None, budget: int | None = None,
                 stats: str = "auto", tile_plan: TilePlan | None = None, progress=None,
                 report: dict | None = None) -> torch.Tensor:
    """vae.decode(z) computed in tiles: raw latents (B, C, h, w) -> images (B, 3, 8h, 8w). Arguments as tiled_encode."""
    tile_plan = tile_plan or plan(vae, tuple(z.shape), "decode", mode="on", budget=budget, tile_size=tile_size,
                                  stats=stats)
    return _execute(vae, z, "decode", tile_plan, progress, report)


def encode(vae: AutoencoderKL, x: torch.Tensor, *, mode: str = "auto", tile_size: int | None = None,
           budget: int | None = None, dtype: torch.dtype | None = None, report: dict | None = None) -> DiagonalGaussian:
    """vae.encode(x), tiled when `mode` says so (auto: when the untiled estimate exceeds the budget)."""
    p = plan(vae, tuple(x.shape), "encode", mode=mode, budget=budget, tile_size=tile_size, dtype=dtype)
    if not p.tile:
        if report is not None:
            report.update(plan=p.describe(), segments=0)
        return vae.encode(x)
    return tiled_encode(vae, x, tile_plan=p, report=report)


def decode(vae: AutoencoderKL, z: torch.Tensor, *, mode: str = "auto", tile_size: int | None = None,
           budget: int | None = None, dtype: torch.dtype | None = None, report: dict | None = None) -> torch.Tensor:
    """vae.decode(z), tiled when `mode` says so (auto: when the untiled estimate exceeds the budget)."""
    p = plan(vae, tuple(z.shape), "decode", mode=mode, budget=budget, tile_size=tile_size, dtype=dtype)
    if not p.tile:
        if report is not None:
            report.update(plan=p.describe(), segments=0)
        return vae.decode(z)
    return tiled_decode(vae, z, tile_plan=p, report=report)
