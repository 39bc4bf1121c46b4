"""`Model` is the same network as diffusers' UNet2DModel in the DDPM configuration."""

import math

import pytest
import torch
from diffusers import UNet2DModel

from latentctl.checkpoints import diffusers_to_ldm
from latentctl.modules import Model, timestep_embedding

CONFIGS = {
    "reduced": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32),
    "ch128": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), resolution=32),
}


def diffusers_ddpm(c):
    res, down, up = c["resolution"], [], []
    for i in range(len(c["ch_mult"])):
        down.append("AttnDownBlock2D" if res in c["attn_resolutions"] else "DownBlock2D")
        res //= 2 if i < len(c["ch_mult"]) - 1 else 1
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    return UNet2DModel(sample_size=c["resolution"], in_channels=3, out_channels=3, layers_per_block=c["num_res_blocks"],
                       block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]), down_block_types=tuple(down),
                       up_block_types=tuple(up), flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
                       norm_eps=1e-6, attention_head_dim=None)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ch128" else n for n in CONFIGS])
def test_model_matches_diffusers_unet2d(name, monkeypatch):
    """Same weights, same outputs to float32 accuracy (max error ~2e-6 of the output range). diffusers rounds its sinusoid frequencies in float32 (1.5e-5 off the
    closed form at t=500, see the test below), so the network is compared here on diffusers' embedding."""
    from diffusers.models.embeddings import get_timestep_embedding

    import latentctl.modules.unet as unet
    monkeypatch.setattr(unet, "timestep_embedding", lambda t, dim: get_timestep_embedding(t, dim, False, 1))
    c = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers_ddpm(c).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = Model(out_ch=3, in_channels=3, **c).eval()
    mapped = diffusers_to_ldm(ref.state_dict())
    assert mapped.keys() == ours.state_dict().keys()  # every parameter maps one to one
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, c["resolution"], c["resolution"])
    from latentctl.modules import fastconv

    with torch.no_grad():
        for t in ([0, 1], [10, 500], [999, 250]):
            t = torch.tensor(t)
            want = ref(x, t).sample
            scale = max(1.0, want.abs().max().item())
            with monkeypatch.context() as direct:   # oneDNN's direct convolutions, as diffusers runs
                direct.setattr(fastconv, "nnpack_ready", lambda: False)
                assert (ours(x, t) - want).abs().max() < 5e-6 * scale, t  # float32 summation order
            # the 3x3 res-block convolutions through NNPACK's Winograd (modules/fastconv.py): its rounding
            assert (ours(x, t) - want).abs().max() < 1e-4 * scale, t


def test_timestep_embedding_closed_form():
    dim, half = 64, 32
    for t in (0, 1, 17, 999):
        emb = timestep_embedding(torch.tensor([t]), dim)[0]
        for i in (0, 5, half - 1):
            freq = math.exp(-math.log(10000) * i / (half - 1))
            assert emb[i].item() == pytest.approx(math.sin(t * freq), abs=1e-5)
            assert emb[half + i].item() == pytest.approx(math.cos(t * freq), abs=1e-5)
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)  # odd width: zero-padded


def test_timestep_embedding_is_closer_to_closed_form_than_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([10, 500, 999])
    half = 32
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    exact = torch.cat([torch.sin(t.double()[:, None] * freqs), torch.cos(t.double()[:, None] * freqs)], dim=1)
    ours = (timestep_embedding(t, 64).double() - exact).abs().max()
    theirs = (get_timestep_embedding(t, 64, False, 1).double() - exact).abs().max()
    assert ours < 1e-7 and ours <= theirs
