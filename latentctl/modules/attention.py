"""Self-attention over pixels, with the compute backend chosen by name independently of the weights.

Two weight layouts exist in the wild:
- `AttnBlock` (`norm`, `q`, `k`, `v`, `proj_out`, all 1x1 convs): every public VAE. Its softmax attention
  runs through one of BACKENDS: `sdpa`, `xformers`, or `linear` (an O(N) approximation, see below).
- `LinAttnBlock` (`to_qkv`, `to_out`): the original linear-attention layout; it always runs as trained.

Every backend takes q, k, v as (B, N, C) with the channel dimension contiguous and never builds the
N x N matrix: torch's CPU flash kernel needs stride 1 on the last dimension and otherwise falls back to
the math path, which materialises N x N (16 GiB in fp32 for the mid block of a 2048 x 2048 decode).
"""

import functools
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

    # xformers wants (B, N, heads, D); same scale C**-0.5 as sdpa.
    return xformers.ops.memory_efficient_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """First-order expansion of softmax attention around uniform weights, O(N C^2) instead of O(N^2 C).

    softmax is unchanged by subtracting a per-query constant from the logits, so the keys are centred
    (k - mean k): then exp(s) ~ 1 + s gives weights (1 + s_ij) / N exactly (the centred logits sum to 0),
    and out_i = mean(v) + q_i . (K_c^T V) / (N sqrt(C)). The error per weight is O(s_ij^2): exact in the
    limit of small logits, an approximation otherwise (trained VAEs have large logits: roundtrip shows the
    cost). The normaliser is exactly N, so it never divides by something near zero.
    """
    n, c = k.shape[1], k.shape[2]
    kc = (k - k.mean(dim=1, keepdim=True)).float()
    context = kc.transpose(1, 2) @ v.float()  # (B, C, C), accumulated in fp32: fp16 sums over N overflow
    out = torch.baddbmm(v.float().mean(dim=1, keepdim=True), q.float(), context, alpha=c**-0.5 / n)  # one (B, N, C)
    return out.to(v.dtype)


BACKENDS = {"sdpa": sdpa_attention, "xformers": xformers_attention, "linear": linear_attention}


@functools.lru_cache(maxsize=None)
def _xformers_problem(device: str) -> str | None:
    """Why xformers cannot run on `device` (None if it can), found by one tiny call the way AttnBlock makes it."""
    missing = importlib.util.find_spec("xformers") is None
    no_cuda = torch.device(device).type != "cuda"
    if missing and no_cuda:
        return (f"xformers is not installed, and it needs a CUDA device (this run uses {device}); "
                "use --attn sdpa")
    if missing:
        return "xformers is not installed: pip install 'latentctl[xformers]' (CUDA only), or use --attn sdpa"
    if no_cuda:
        return f"xformers has no CPU kernels and this run uses {device}: use --attn sdpa, or --device cuda"
    try:  # an install built for another torch or CUDA imports fine and fails at the first call
        x = torch.zeros(1, 8, 512, device=device, dtype=torch.float16)  # head width of a VAE's attention
        xformers_attention(x, x, x)
    except Exception as e:  # noqa: BLE001 -- any failure means "cannot run here", reported with its reason
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"xformers is installed but cannot run on {device} ({first}); use --attn sdpa"
    return None


def check_backend(name: str, device: torch.device | str = "cpu") -> None:
    """Raise BackendUnavailable with the reason and the fix when `name` cannot run on `device`."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "xformers":
        problem = _xformers_problem(str(torch.device(device)))
        if problem:
            raise BackendUnavailable(f"--attn xformers: {problem}")


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C), a view


class AttnBlock(nn.Module):
    """x + proj_out(attention(norm(x))): single-head self-attention over all H*W positions, or, with `window`,
    the whole block run separately on window x window tiles, as if each tile were the image: how a model
    trained on crops sees a large image the way it saw its crops (and in time linear in the image area)."""

    window: int = 0     # 0: global

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

    def _project(self, conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        # A 1x1 conv is a linear map over channels; applied to tokens it yields (B, N, C) with the channel
        # dimension contiguous, which keeps sdpa on its O(N)-memory kernel (see the module docstring).
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window and (x.shape[2] > self.window or x.shape[3] > self.window):
            out = torch.empty_like(x)
            for (y0, y1, x0, x1) in windows(x.shape[2], x.shape[3], self.window):
                out[:, :, y0:y1, x0:x1] = self._block(x[:, :, y0:y1, x0:x1])
            return out
        return self._block(x)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = _to_tokens(self.norm(x))
        # each (B, HW, C); no generator here: `del` of a variable a closure captured stops torch.compile's tracing
        q, k, v = self._project(self.q, y), self._project(self.k, y), self._project(self.v, y)
        del y  # each dropped (B, HW, C) is 128 MiB at 2048x2048: the peak here is what bounds image size
        out = self.attend(q, k, v)
        del q, k, v
        out = self._project(self.proj_out, out)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)  # the sum takes x's memory format

    def flops(self, batch: int, h: int, w: int) -> int:
        """Multiply-adds x 2 for `batch` images of h x w positions: 4 projections plus the attention itself."""
        if self.window and (h > self.window or w > self.window):
            return sum(self.flops(batch, y1 - y0, x1 - x0) for y0, y1, x0, x1 in windows(h, w, self.window))
        c, tokens = self.q.out_channels, h * w
        proj = 4 * 2 * tokens * c * c
        # softmax: q k^T and weights @ v, each N x N x C; linear: K_c^T V and q @ context, each N x C x C.
        core = 2 * 2 * tokens * (c * c if self.backend == "linear" else tokens * c)
        return batch * (proj + core)


def windows(h: int, w: int, size: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the size x size tiles covering h x w from the top left (smaller at the far edges)."""
    return [(y, min(y + size, h), x, min(x + size, w)) for y in range(0, h, size) for x in range(0, w, size)]


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

    def flops(self, batch: int, h: int, w: int) -> int:
        """Multiply-adds x 2: to_qkv (3 C^2 per position), to_out (C^2), and two N x C x C products."""
        c, tokens = self.to_out.out_channels, h * w
        return batch * 2 * tokens * c * c * (3 + 1 + 2)


class NoAttn(nn.Identity):
    def set_backend(self, backend: str) -> None:
        pass


ATTN_TYPES = {"vanilla": AttnBlock, "linear": LinAttnBlock, "none": NoAttn}


def make_attn(channels: int, attn_type: str = "vanilla", backend: str = "sdpa") -> nn.Module:
    """The attention block for a weight layout ("vanilla" | "linear" | "none"), computing with `backend`."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"unknown attention type {attn_type!r}; choose one of {', '.join(ATTN_TYPES)}")
    return ATTN_TYPES[attn_type](channels, backend) if attn_type != "none" else NoAttn()
