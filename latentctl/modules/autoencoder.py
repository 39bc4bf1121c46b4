"""The KL autoencoder of latent diffusion: Encoder, Decoder, diagonal Gaussian posterior, AutoencoderKL.

Parameter names follow the original code (`down.0.block.1.norm1`, `mid.attn_1.q`, `up.3.upsample.conv`),
so LDM/SGM checkpoints load with no renaming; `checkpoints.py` maps the diffusers names onto these.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import AttnBlock, make_attn
from .blocks import Downsample, Normalize, ResnetBlock, Upsample, fix_norms, norm_swish


def down_levels(*, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, resolution: int, dropout: float,
                resamp_with_conv: bool, attn_type: str, attn_backend: str, temb_channels: int = 0) -> nn.ModuleList:
    """The contracting path of Encoder and Model: per level `block` (res blocks), `attn` (one per block where the
    resolution is in attn_resolutions) and `downsample` (all but the last level)."""
    in_mult, res, levels = (1, *ch_mult), resolution, nn.ModuleList()
    for i, mult in enumerate(ch_mult):
        level = nn.Module()
        level.block, level.attn = nn.ModuleList(), nn.ModuleList()
        width_in, width = ch * in_mult[i], ch * mult
        for _ in range(num_res_blocks):
            level.block.append(ResnetBlock(in_channels=width_in, out_channels=width, dropout=dropout,
                                           temb_channels=temb_channels))
            width_in = width
            if res in attn_resolutions:
                level.attn.append(make_attn(width, attn_type, attn_backend))
        if i != len(ch_mult) - 1:
            level.downsample = Downsample(width, resamp_with_conv)
            res //= 2
        levels.append(level)
    return levels


def mid_block(width: int, *, dropout: float, attn_type: str, attn_backend: str, temb_channels: int = 0) -> nn.Module:
    """ResBlock - attention - ResBlock at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=width, out_channels=width, dropout=dropout, temb_channels=temb_channels)
    mid.attn_1 = make_attn(width, attn_type, attn_backend)
    mid.block_2 = ResnetBlock(in_channels=width, out_channels=width, dropout=dropout, temb_channels=temb_channels)
    return mid


class Encoder(nn.Module):
    """image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/2^(L-1), W/2^(L-1)) (or z_channels if not double_z)."""

    def __init__(self, *, ch: int, ch_mult=(1, 2, 4, 4), num_res_blocks: int, attn_resolutions=(),
                 in_channels: int, z_channels: int, double_z: bool = True, resolution: int = 256,
                 dropout: float = 0.0, resamp_with_conv: bool = True, attn_type: str = "vanilla",
                 attn_backend: str = "sdpa"):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = down_levels(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                                resolution=resolution, dropout=dropout, resamp_with_conv=resamp_with_conv,
                                attn_type=attn_type, attn_backend=attn_backend)
        width = ch * ch_mult[-1]
        self.mid = mid_block(width, dropout=dropout, attn_type=attn_type, attn_backend=attn_backend)
        self.norm_out = Normalize(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only the running activation is kept (no list of every level's output): matters for large images.
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_swish(self.norm_out, h))


class Decoder(nn.Module):
    """latent (B, z_channels, h, w) -> image (B, out_ch, h*2^(L-1), w*2^(L-1)).

    `_make_attn`, `_make_resblock` and `_make_conv` build the mid block, the up blocks and conv_out;
    a subclass overrides one of them to swap that part (e.g. temporal blocks) and keeps the structure.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 4), num_res_blocks: int, attn_resolutions=(),
                 in_channels: int = 3, z_channels: int, resolution: int = 256, dropout: float = 0.0,
                 resamp_with_conv: bool = True, give_pre_end: bool = False, tanh_out: bool = False,
                 attn_type: str = "vanilla", attn_backend: str = "sdpa"):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        self.attn_type, self.attn_backend = attn_type, attn_backend
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = self._make_resblock(in_channels=width, out_channels=width, dropout=dropout)
        self.mid.attn_1 = self._make_attn(width)
        self.mid.block_2 = self._make_resblock(in_channels=width, out_channels=width, dropout=dropout)
        up = []  # built from the lowest resolution up; stored so that up[0] is the highest resolution
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(self._make_resblock(in_channels=width, out_channels=ch * ch_mult[i], dropout=dropout))
                width = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(self._make_attn(width))
            if i != 0:
                level.upsample = Upsample(width, resamp_with_conv)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(width)
        self.conv_out = self._make_conv(width, out_ch, kernel_size=3, padding=1)

    def _make_attn(self, channels: int) -> nn.Module:
        return make_attn(channels, self.attn_type, self.attn_backend)

    def _make_resblock(self, **kwargs) -> nn.Module:
        return ResnetBlock(**kwargs)

    def _make_conv(self, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, **kwargs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(norm_swish(self.norm_out, h))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from the encoder's moments (B, 2C, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite, as the original does
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per item, summed over C, h, w."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class AEConfig:
    """Everything that fixes the network's shape; inferred from weights by checkpoints.infer_config()."""

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4                 # channels the decoder takes (the encoder gives 2x with double_z)
    embed_dim: int = 4                  # latent channels after quant_conv; equals z_channels without quant convs
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple = ()        # resolutions (nominal, from `resolution`) with attention in the levels
    resolution: int = 256               # nominal; only used to place attn_resolutions
    mid_attn: str = "vanilla"           # weight layout of mid.attn_1: vanilla | linear | none
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dropout: float = 0.0
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    attn_backend: str = "sdpa"          # how softmax attention computes; independent of the weights
    attn_window: int = 0                # attention blocks run on tiles of this many latent pixels a side (0: whole)
    decoder_norm: str = "group"         # the decoder's norms: group (per-image statistics) | fixed (FixedGroupNorm)
    extra: dict = field(default_factory=dict)

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim if self.use_post_quant_conv else self.z_channels


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> latents. `encode` gives the posterior of raw latents z; `normalize` makes them model-ready."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = c = config
        shape = dict(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                     attn_resolutions=tuple(c.attn_resolutions), z_channels=c.z_channels, resolution=c.resolution,
                     dropout=c.dropout, attn_type=c.mid_attn, attn_backend=c.attn_backend)
        self.encoder = Encoder(in_channels=c.in_channels, double_z=True, **shape)
        self.decoder = Decoder(out_ch=c.out_ch, **shape)
        if c.decoder_norm == "fixed":
            fix_norms(self.decoder)
        elif c.decoder_norm != "group":
            raise ValueError(f"decoder_norm must be group or fixed, not {c.decoder_norm!r}")
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1) if c.use_post_quant_conv else None
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.window = c.attn_window

    def set_attn_backend(self, backend: str) -> None:
        for m in self.modules():
            if hasattr(m, "set_backend"):
                m.set_backend(backend)
        self.config.attn_backend = backend

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the convolutions' weights' (GroupNorm affines may be kept in float32)."""
        return self.encoder.conv_in.weight.dtype

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        # Latent files store fp16 or bf16 and images may come in any float type: the first conv needs its own.
        # Under autocast the weights stay float32 and autocast casts the activations itself.
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) in [-1, 1], any float dtype (computed in self.dtype) -> posterior over raw latents."""
        moments = self.encoder(self._as_input(x))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w), any float dtype (fp16 from a latent file included) -> images about [-1, 1]."""
        z = self._as_input(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """raw latent -> model-ready latent: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """model-ready latent -> raw latent: latent / scale + shift."""
        return latent / self.config.scaling_factor + self.config.shift_factor
