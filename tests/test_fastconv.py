"""fp32 3x3 convolutions through NNPACK (modules/fastconv.py): where they go, how far they are from exact, and that
the model with them stays within 1e-4 of diffusers, batch-invariant and tiled within 1e-4 of untiled."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vae

from latentctl import tiling
from latentctl.modules import fastconv


@pytest.fixture
def nnpack_on(monkeypatch):
    """NNPACK serves what it can, also on a CPU where it would not be chosen (AVX-512: fastconv.nnpack_ready)."""
    monkeypatch.setattr(fastconv, "nnpack_ready", fastconv.nnpack_available)


@pytest.fixture
def nnpack_calls(monkeypatch, nnpack_on):
    """The number of NNPACK convolutions run so far (torch._nnpack_spatial_convolution wrapped)."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counted)
    return calls


def test_nnpack_is_there_on_this_cpu():
    """x86 with AVX2 (and ARM with NEON) has NNPACK in every torch wheel; without it nothing here would be tested."""
    assert fastconv.nnpack_available() == bool(torch._nnpack_available())
    assert fastconv.nnpack_available(), "NNPACK unavailable: fp32 falls back to oneDNN (2x slower for SD-VAE on AVX2)"


@pytest.mark.parametrize("capability,nnpack", [("AVX2", True), ("AVX512", False), ("DEFAULT", True)])
def test_nnpack_only_where_onednn_is_narrower(capability, nnpack, monkeypatch):
    """AVX-512 CPUs keep oneDNN's direct kernels, in channels_last; elsewhere fp32 takes NNPACK, held NCHW."""
    from latentctl.modules import precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    fastconv.nnpack_ready.cache_clear()
    try:
        assert fastconv.nnpack_ready() is nnpack
        x, w = torch.randn(1, 32, 12, 12), torch.randn(32, 32, 3, 3)
        with torch.inference_mode():
            assert fastconv.uses_nnpack(x, w) is nnpack
        want = torch.contiguous_format if nnpack else torch.channels_last
        assert precision.cpu_layout(torch.float32) == want
        assert precision.cpu_layout(torch.bfloat16) == torch.channels_last
    finally:
        monkeypatch.undo()
        fastconv.nnpack_ready.cache_clear()


@pytest.mark.parametrize("cin,cout,size,padding", [(32, 32, 37, 1), (64, 32, 20, 1), (32, 48, 16, 0)])
def test_nnpack_conv_is_close_to_exact(cin, cout, size, padding, nnpack_calls):
    """Against the float64 convolution: within 1e-5 of the output's largest magnitude (oneDNN's fp32: ~1e-7)."""
    g = torch.Generator().manual_seed(cin + size)
    x = torch.randn(2, cin, size, size + 3, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    b = torch.randn(cout, generator=g)
    with torch.inference_mode():
        got = fastconv.conv2d(x, w, b, padding)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
    assert len(nnpack_calls) == 1
    assert got.shape == exact.shape and got.dtype == torch.float32
    err = float((got.double() - exact).abs().max() / exact.abs().max())
    assert 0 < err < 1e-5, err   # not zero: it really is another algorithm


@pytest.mark.parametrize("padding", [0, 1])
def test_bands_of_rows_give_the_whole_convolution(padding, nnpack_calls, monkeypatch):
    """Large inputs go to NNPACK in bands of rows (its workspace is kept between calls): the bands, the image
    borders' zero padding and the last short band together give the whole convolution, to Winograd's error."""
    g = torch.Generator().manual_seed(7 + padding)
    x = torch.randn(2, 32, 41, 23, generator=g)
    w = torch.randn(40, 32, 3, 3, generator=g) / (9 * 32) ** 0.5
    b = torch.randn(40, generator=g)
    monkeypatch.setattr(fastconv, "BAND_BYTES", 2 * 32 * 23 * 4 * 13)   # 13 input rows: 12-row bands
    with torch.inference_mode():
        got = fastconv.conv2d(x, w, b, padding)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=padding)
    assert len(nnpack_calls) == 4 and {s[2] for s in nnpack_calls} == {12 + 2, 41 + 2 * padding - 2 - 36 + 2}
    assert got.shape == exact.shape
    assert float((got.double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_what_stays_on_onednn(nnpack_calls):
    """Grad mode, bf16, autocast, narrow layers (the halves' first and last convolutions), other kernel sizes."""
    x, w = torch.randn(1, 32, 12, 12), torch.randn(32, 32, 3, 3)
    with torch.inference_mode():
        assert fastconv.uses_nnpack(x, w)
        assert not fastconv.uses_nnpack(x.bfloat16(), w.bfloat16())
        assert not fastconv.uses_nnpack(x[:, :3], w[:, :3])          # 3 input channels (encoder.conv_in)
        assert not fastconv.uses_nnpack(x, w[:3])                     # 3 outputs (decoder.conv_out)
        assert not fastconv.uses_nnpack(x, w[:, :, :1, :1])           # 1x1
        assert not fastconv.uses_nnpack(x.to("meta"), w.to("meta"))   # the FLOP counter
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fastconv.uses_nnpack(x, w)
    with torch.enable_grad():
        assert not fastconv.uses_nnpack(x, w)
    assert not nnpack_calls


def test_the_environment_turns_it_off():
    code = "from latentctl.modules import fastconv; print(fastconv.nnpack_available(), fastconv.nnpack_ready())"
    env = {**os.environ, "LATENTCTL_NNPACK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_the_model_with_nnpack_matches_diffusers(nnpack_calls):
    """The SD layout at reduced width (4 levels, 2 res blocks, mid attention) against diffusers' AutoencoderKL on
    the same weights: within 1e-4, as with direct convolutions (tests/test_autoencoder.py)."""
    from latentctl.bench import diffusers_twin

    vae = make_tiny_vae(3, jitter=0.05, ch_mult=(1, 2, 2, 2), num_res_blocks=2)
    twin = diffusers_twin(vae)
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ours, ref = vae.encode(x).mean, twin.encode(x).latent_dist.mean
        assert nnpack_calls
        assert (ours - ref).abs().max() < 1e-4
        assert (vae.decode(ref) - twin.decode(ref).sample).abs().max() < 1e-4


def test_an_image_comes_out_within_1e4_in_any_batch(nnpack_on):
    """NNPACK gives an image the same numbers alone or in a batch; oneDNN's other layers differ in the last bits
    between the two (3e-6 at the end with direct convolutions), and Winograd's rounding of two inputs that differ
    in the last bits differs by its own error (~1e-5 of the scale)."""
    w, x = torch.randn(32, 32, 3, 3), torch.randn(3, 32, 20, 20)
    with torch.inference_mode():
        assert torch.equal(fastconv.conv2d(x, w, None, 1)[1:2], fastconv.conv2d(x[1:2], w, None, 1))
    vae = make_tiny_vae(5, jitter=0.05)
    x = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        batch = vae.encode(x).mean
        one = torch.cat([vae.encode(x[i:i + 1]).mean for i in range(3)])
        assert (batch - one).abs().max() < 1e-4
        z = batch
        assert (vae.decode(z) - torch.cat([vae.decode(z[i:i + 1]) for i in range(3)])).abs().max() < 1e-4


def test_tiled_with_nnpack_stays_within_1e4_of_untiled(nnpack_calls):
    """Tiles put Winograd's blocks elsewhere than the whole image does: the two differ by its rounding only."""
    vae = make_tiny_vae(6, jitter=0.05, ch_mult=(1, 2, 2, 2))
    x = torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        whole = vae.encode(x).mean
        tiled = tiling.encode(vae, x, mode="on", tile_size=32).mean
        assert (tiled - whole).abs().max() < 1e-4
        z = whole
        assert (tiling.decode(vae, z, mode="on", tile_size=4) - vae.decode(z)).abs().max() < 1e-4
    assert nnpack_calls
