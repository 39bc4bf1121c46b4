"""Regions (y0, y1, x0, x1), half-open, at one position's resolution: what each layer needs of its input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import fastconv
from .ops import Op, _Net


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
    if op.kind == "affine":
        y = op.module(_crop(cur, have, out_r))
        return F.silu(y, inplace=True) if op.act else y
    if op.kind == "tanh":
        return torch.tanh(_crop(cur, have, out_r))
    raise AssertionError(f"not a local op: {op.kind}")
