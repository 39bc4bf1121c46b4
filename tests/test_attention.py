"""Attention backends: same results as the original block, bounded memory, the linear approximation, both layouts."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY

from latentctl import load, load_autoencoder
from latentctl.errors import BackendUnavailable
from latentctl.modules import AEConfig, AttnBlock, AutoencoderKL, LinAttnBlock
from latentctl.modules.attention import check_backend, linear_attention, sdpa_attention



def original_attn_block(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The original LDM AttnBlock, written out: 1x1 convs, bmm, softmax with scale C**-0.5, residual."""
    b, c, h, w = x.shape
    y = block.norm(x)
    q, k, v = block.q(y), block.k(y), block.v(y)
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # (B, N, C)
    k = k.reshape(b, c, h * w)  # (B, C, N)
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, N, N)
    out = torch.bmm(v.reshape(b, c, h * w), weights.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(out)


def test_sdpa_block_matches_original_block():
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 8, 12)
    with torch.inference_mode():
        out = block(x)
        assert out.shape == x.shape and out.is_contiguous()
        torch.testing.assert_close(out, original_attn_block(block, x), atol=1e-5, rtol=1e-5)
        # channels_last in, channels_last out (the residual keeps x's memory format)
        out_cl = block(x.to(memory_format=torch.channels_last))
        assert out_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-5)


def test_windowed_block_is_the_original_block_on_each_tile():
    """window=W: the whole block (its GroupNorm included) on each W x W tile as if it were the image; the far
    tiles are smaller. Checked against the written-out original block on crops, and FLOPs per tile."""
    torch.manual_seed(1)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 11, 9)
    with torch.inference_mode():
        whole = block(x)
        block.window = 4
        out = block(x)
        for y0, x0 in [(0, 0), (4, 4), (8, 8), (8, 0)]:     # interior, last row, corner (3 x 1), left edge
            crop = x[:, :, y0:y0 + 4, x0:x0 + 4]
            torch.testing.assert_close(out[:, :, y0:y0 + 4, x0:x0 + 4], original_attn_block(block, crop),
                                       atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, whole, atol=1e-3)
        small = x[:, :, :4, :3]       # no larger than a window: the global block
        torch.testing.assert_close(block(small), original_attn_block(block, small), atol=1e-5, rtol=1e-5)
    tiles = [(4, 4)] * 4 + [(4, 1)] * 2 + [(3, 4)] * 2 + [(3, 1)]
    windowed = block.flops(2, 11, 9)
    block.window = 0
    assert windowed == sum(block.flops(2, h, w) for h, w in tiles) < block.flops(2, 11, 9)


def test_attn_window_comes_from_models_toml(tmp_path):
    from latentctl.registry import get_entry

    assert get_entry("default").config().attn_window == 32
    vae, _ = load()
    assert {m.window for m in vae.modules() if isinstance(m, AttnBlock)} == {32}
    toml = tmp_path / "models.toml"
    toml.write_text('[w8]\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_window = 8\n')
    vae, _ = load("w8", models_file=toml, random_weights=True)
    assert {m.window for m in vae.modules() if isinstance(m, AttnBlock)} == {8}


def test_linear_attention_is_first_order_in_the_logits():
    """Halving every logit q.k/sqrt(C) quarters the error of the linear backend: the error is O(s^2), so the
    approximation is exact in the limit of small logits."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 64, generator=g) for _ in range(3))
    errors = [(linear_attention(q * s, k, v) - sdpa_attention(q * s, k, v)).abs().max().item()
              for s in (0.5, 0.25, 0.125)]
    for big, small in zip(errors, errors[1:]):
        assert 3.0 < big / small < 5.0, errors
    assert errors[-1] < 1e-2
    # all keys equal: softmax weights are uniform, and the expansion is exact
    same_k = k[:, :1].expand_as(k)
    torch.testing.assert_close(linear_attention(q, same_k, v), sdpa_attention(q, same_k, v), atol=1e-5, rtol=1e-5)


def test_linear_close_to_sdpa_on_tiny_model_with_small_logits():
    """On a tiny random model whose query weights are scaled by 0.1, the mid-block logits q.k/sqrt(C) have a
    standard deviation of about 0.03, so softmax ~ 1 + s and the linear backend's O(s^2) error is tiny."""
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(**TINY)).eval()
    with torch.no_grad():
        for block in (vae.encoder.mid.attn_1, vae.decoder.mid.attn_1):
            block.q.weight.mul_(0.1)
            block.q.bias.mul_(0.1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, 4, 16, 16)
    out = {}
    with torch.inference_mode():
        for backend in ("sdpa", "linear"):
            vae.set_attn_backend(backend)
            out[backend] = (vae.encode(x).mean, vae.decode(z))
    for ref, approx in zip(out["sdpa"], out["linear"]):
        assert (approx - ref).abs().max() < 1e-3 * ref.abs().max()


def test_linear_attention_layout_checkpoint_loads_and_runs(tmp_path):
    """A checkpoint in the original linear-attention layout (to_qkv, to_out) is detected, loads strictly, and
    runs as trained whatever backend is asked for (the backend applies to softmax attention only)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = AutoencoderKL(AEConfig(**TINY, mid_attn="linear")).eval()
    assert isinstance(trained.encoder.mid.attn_1, LinAttnBlock)
    path = tmp_path / "linattn.safetensors"
    save_file(trained.state_dict(), str(path))
    assert any(k.endswith("mid.attn_1.to_qkv.weight") for k in trained.state_dict())

    loaded = load_autoencoder(path)
    assert loaded.config.mid_attn == "linear"
    vae, _ = load(None, weights=path, attn="linear")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        ref = trained.decode(trained.encode(x).mean)
        for backend in ("sdpa", "linear"):
            loaded.set_attn_backend(backend)
            torch.testing.assert_close(loaded.decode(loaded.encode(x).mean), ref)
        # load() holds the model in this CPU's fp32 layout (channels_last where oneDNN serves fp32): the same
        # network summed in another order, ~1e-5 apart
        torch.testing.assert_close(vae.decode(vae.encode(x).mean), ref, atol=1e-4, rtol=0)


def test_unknown_and_unavailable_backends():
    with pytest.raises(BackendUnavailable, match="choose one of sdpa, xformers, linear"):
        check_backend("flash", "cpu")
    with pytest.raises(BackendUnavailable, match="choose one of"):
        AttnBlock(32, backend="flash")
    with pytest.raises(BackendUnavailable, match=r"--attn xformers: .*(CPU|CUDA).*--attn sdpa"):
        check_backend("xformers", "cpu")  # xformers has no CPU kernels, installed or not
    assert BackendUnavailable.exit_code == 2


MEMORY_PROBE = textwrap.dedent("""
    import resource, torch
    from latentctl.modules import AttnBlock
    n_side, c = 64, 64                      # 4096 tokens: an N x N fp32 matrix is 64 MiB
    block = AttnBlock(c).eval()
    x = torch.randn(1, c, n_side, n_side)
    with torch.inference_mode():
        block(x[..., :8, :8])               # warm-up, small: a peak here would hide the one measured
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for backend in ("sdpa", "linear"):
            block.set_backend(backend)
            block(x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # MiB above the warm-up
""")


def test_attention_never_builds_the_n_by_n_matrix():
    """In a fresh process (peak RSS is per process), sdpa and linear on 4096 tokens stay far below the 64 MiB
    an N x N matrix would take. (torch's CPU sdpa falls back to a path that builds it when q, k, v are not
    contiguous in the channel dimension; AttnBlock keeps them so.)"""
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    assert grown_mib < 32, f"peak RSS grew {grown_mib:.0f} MiB: the N x N matrix was built"


@pytest.mark.cuda
def test_xformers_matches_sdpa_in_fp16_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (xformers has no CPU kernels)")
    try:  # missing, or installed for another torch/CUDA (it imports, then has no kernels): skip with the reason
        check_backend("xformers", "cuda")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    block = AttnBlock(512).eval().to("cuda", torch.float16)
    x = torch.randn(2, 512, 64, 64, device="cuda", dtype=torch.float16)  # 4096 tokens, the SD mid block at 512 px
    with torch.inference_mode():
        ref = block(x)
        block.set_backend("xformers")
        out = block(x)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)  # fp16: ~1e-3 relative, accumulations differ
