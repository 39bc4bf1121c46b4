"""The KL-autoencoder module library (generative-models design, original weight names)."""

from .attention import BACKENDS, AttnBlock, LinAttnBlock, make_attn
from .autoencoder import AEConfig, AutoencoderKL, Decoder, DiagonalGaussian, Encoder
from .blocks import Downsample, FixedGroupNorm, Normalize, ResnetBlock, Upsample, swish, timestep_embedding
from .unet import Model

__all__ = [
    "AEConfig", "AttnBlock", "AutoencoderKL", "BACKENDS", "Decoder", "DiagonalGaussian",
    "Downsample", "Encoder", "FixedGroupNorm", "LinAttnBlock", "Model", "Normalize", "ResnetBlock", "Upsample",
    "make_attn", "swish", "timestep_embedding",
]
