"""`Model`: the timestep-conditioned U-Net of DDPM, built from the same blocks as the autoencoder."""

import torch
from torch import nn

from .attention import make_attn
from .autoencoder import down_levels, mid_block
from .blocks import Normalize, ResnetBlock, Upsample, norm_swish, swish, timestep_embedding


class Model(nn.Module):
    """x (B, in_channels, H, W), t (B,) -> (B, out_ch, H, W). Skip connections concatenate on the way up."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions=(),
                 dropout: float = 0.0, resamp_with_conv: bool = True, in_channels: int, resolution: int,
                 use_timestep: bool = True, attn_type: str = "vanilla", attn_backend: str = "sdpa"):
        super().__init__()
        self.ch, self.num_levels, self.use_timestep = ch, len(ch_mult), use_timestep
        self.temb_ch = 4 * ch if use_timestep else 0
        if use_timestep:
            self.temb = nn.Module()
            self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        attn = lambda width: make_attn(width, attn_type, attn_backend)  # noqa: E731
        resblock = lambda cin, cout: ResnetBlock(in_channels=cin, out_channels=cout,  # noqa: E731
                                                 temb_channels=self.temb_ch, dropout=dropout)

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        shape = dict(dropout=dropout, attn_type=attn_type, attn_backend=attn_backend, temb_channels=self.temb_ch)
        self.down = down_levels(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                                resolution=resolution, resamp_with_conv=resamp_with_conv, **shape)
        width = ch * ch_mult[-1]
        self.mid = mid_block(width, **shape)
        # widths of the activations the up path concatenates: conv_in's, each res block's, each downsample's
        skip_widths = [ch]
        for i, mult in enumerate(ch_mult):
            skip_widths += [ch * mult] * (num_res_blocks + (i != self.num_levels - 1))
        res = resolution // 2 ** (self.num_levels - 1)

        up = []
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(resblock(width + skip_widths.pop(), ch * ch_mult[i]))
                width = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(attn(width))
            if i != 0:
                level.upsample = Upsample(width, resamp_with_conv)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, context: torch.Tensor | None = None):
        if context is not None:
            x = torch.cat([x, context], dim=1)  # spatial conditioning, as in the original
        temb = None
        if self.use_timestep:
            temb = self.temb.dense[1](swish(self.temb.dense[0](timestep_embedding(t, self.ch).to(x.dtype))))
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_levels - 1:
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_1(hs[-1], temb)
        h = self.mid.block_2(self.mid.attn_1(h), temb)
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(norm_swish(self.norm_out, h))
