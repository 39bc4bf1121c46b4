"""Self-attention over pixels, with the compute backend chosen by name independently of the weights.

Two weight layouts exist in the wild:
- `AttnBlock` (`norm`, `q`, `k`, `v`, `proj_out`, all 1x1 convs): every public VAE. Its softmax attention
  runs through one of BACKENDS: `sdpa`, `xformers`, or `linear` (an O(N) approximation, see below).
- `LinAttnBlock` (`to_qkv`, `to_out`): the original linear-attention layout; it always runs as trained.
"""

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendUnavailable
from .blocks import Normalize


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (B, N, C) -> (B, 1, N, C): one head as wide as the channels, scale C**-0.5.
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops  # optional extra; availability is checked by check_backend() before any work

    # xformers wants (B, N, heads, D).
    return xformers.ops.memory_efficient_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """First-order expansion of softmax attention around uniform weights, O(N C^2) instead of O(N^2 C).

    softmax is unchanged by subtracting a per-query constant from the logits, so the keys are centred
    (k - mean k): then exp(s) ~ 1 + s gives weights (1 + s_ij) / N exactly (the centred logits sum to 0),
    and out_i = mean(v) + q_i . (K_c^T V) / (N sqrt(C)). It is exact when the logits are small and an
    approximation otherwise; the normaliser is exactly N, so it never divides by something near zero.
    """
    n, c = k.shape[1], k.shape[2]
    kc = (k - k.mean(dim=1, keepdim=True)).float()
    context = kc.transpose(1, 2) @ v.float()  # (B, C, C), accumulated in fp32: fp16 sums over N overflow
    out = v.float().mean(dim=1, keepdim=True) + (q.float() @ context) * (c**-0.5 / n)
    return out.to(v.dtype)


BACKENDS = {"sdpa": sdpa_attention, "xformers": xformers_attention, "linear": linear_attention}


def check_backend(name: str, device: torch.device | str = "cpu") -> None:
    """Raise BackendUnavailable with the reason and the fix when `name` cannot run on `device`."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise BackendUnavailable("--attn xformers: xformers is not installed "
                                     "(pip install 'latentctl[xformers]', CUDA only); use --attn sdpa")
        if torch.device(device).type != "cuda":
            raise BackendUnavailable(f"--attn xformers: needs a CUDA device, this run uses {device} "
                                     "(xformers has no CPU kernels); use --attn sdpa")


class AttnBlock(nn.Module):
    """x + proj_out(attention(norm(x))): single-head self-attention over all H*W positions."""

    def __init__(self, channels: int, backend: str = "sdpa"):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise BackendUnavailable(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.attend = BACKENDS[backend]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        out = self.attend(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """The original linear-attention layout (`to_qkv`, `to_out`): keys softmaxed over space, no norm, no residual."""

    def __init__(self, channels: int, backend: str = "linear"):
        super().__init__()
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.to_out = nn.Conv2d(channels, channels, 1)

    def set_backend(self, backend: str) -> None:
        pass  # this layout has one way to compute; the weights were trained for it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).flatten(2).chunk(3, dim=1)  # each (B, C, HW)
        k = k.softmax(dim=-1)
        context = k @ v.transpose(1, 2)  # (B, C, C): sum over positions of k_d * v_e
        out = (context.transpose(1, 2) @ q).reshape(b, c, h, w)
        return self.to_out(out)


class NoAttn(nn.Identity):
    def set_backend(self, backend: str) -> None:
        pass


ATTN_TYPES = {"vanilla": AttnBlock, "linear": LinAttnBlock, "none": NoAttn}


def make_attn(channels: int, attn_type: str = "vanilla", backend: str = "sdpa") -> nn.Module:
    """The attention block for a weight layout ("vanilla" | "linear" | "none"), computing with `backend`."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"unknown attention type {attn_type!r}; choose one of {', '.join(ATTN_TYPES)}")
    return ATTN_TYPES[attn_type](channels, backend) if attn_type != "none" else NoAttn()
