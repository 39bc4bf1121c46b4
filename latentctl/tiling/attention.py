"""Attention over the whole latent, in query chunks when the whole block would not fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.attention import AttnBlock
from .stats import GroupStats

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
