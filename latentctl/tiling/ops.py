"""The network as a flat list of operations: what the tiler runs, layer by layer, and each position's shape."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UsageError
from ..modules.attention import AttnBlock, LinAttnBlock, NoAttn
from ..modules.autoencoder import AutoencoderKL
from ..modules.blocks import Downsample, FixedGroupNorm, ResnetBlock, Upsample


class TilingUnsupported(UsageError):
    """The model holds a layer this tiler does not know how to split (e.g. a temporal decoder)."""


# --- the network as a flat list of operations -------------------------------------------------------------------

@dataclass
class Op:
    """One layer. kind: conv | down | pool | up | norm | affine | push | add | tanh | attn. norm (a GroupNorm:
    whole-image statistics) and attn are the global ones; affine (a FixedGroupNorm) is pointwise."""

    kind: str
    module: nn.Module | None = None
    pad: int = 0            # conv / add-shortcut: zero padding each side (kernel = 2*pad + 1)
    act: bool = False       # norm, affine: SiLU after it
    name: str = ""


def _conv(m: nn.Module, name: str) -> Op:
    if type(m) is not nn.Conv2d or m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 \
            or m.padding_mode != "zeros" or m.kernel_size[0] != m.kernel_size[1] \
            or m.padding != (m.kernel_size[0] // 2,) * 2 or m.kernel_size[0] % 2 == 0:
        raise TilingUnsupported(f"tiling: {name} is not a plain odd-kernel stride-1 'same' convolution ({m})")
    return Op("conv", m, pad=m.padding[0], name=name)


def _norm(m: nn.Module, name: str, act: bool = True) -> Op:
    if type(m) is FixedGroupNorm:  # fixed statistics: a per-channel affine map, nothing to gather
        return Op("affine", m, act=act, name=name)
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
