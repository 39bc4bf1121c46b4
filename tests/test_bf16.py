"""Precision: what the model accepts and computes in, and that folded weights follow the weights they come from."""

import copy
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from latentctl.modules import AEConfig, AutoencoderKL

TINY = AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.5, shift_factor=0.1)


def _tiny(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(copy.deepcopy(TINY)).eval().requires_grad_(False)
    with torch.no_grad():  # random GroupNorm affines and biases, so that nothing is at its trivial init
        for name, p in vae.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
    return vae


def test_inplace_reload_in_inference_mode_decodes_with_the_new_weights():
    """Issue 14 item 4: weights made in inference mode have no version counter; after they are reloaded in place
    the decoder (its Upsample phase weights included) must compute with the new ones, as a fresh model does."""
    z = torch.randn(1, 4, 6, 5)
    fresh = _tiny(seed=2)
    with torch.inference_mode():
        vae = _tiny(seed=1)
        vae(torch.zeros(1, 3, 8, 8))  # build it in inference mode, then use it once: whatever it caches, cached
        old = vae.decode(z)
        ptrs = [p.data_ptr() for p in vae.parameters()]
        vae.load_state_dict(fresh.state_dict())           # copied into the same storage
        assert [p.data_ptr() for p in vae.parameters()] == ptrs
        got = vae.decode(z)
        want = fresh.decode(z)
    assert (old - want).abs().max() > 0.1  # the two weight sets really differ
    assert (got - want).abs().max() < 1e-6


def test_inplace_reload_also_holds_channels_last_and_tiled(direct_convs):
    """The same with the CPU layout (channels_last weights, as latentctl.load gives) and through tiled decode."""
    from latentctl import tiling

    z = torch.randn(1, 4, 12, 10)
    fresh = _tiny(seed=4).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        vae = _tiny(seed=3).to(memory_format=torch.channels_last)
        vae.decode(z), tiling.decode(vae, z, mode="on", tile_size=8)
        vae.load_state_dict(fresh.state_dict())
        got, got_tiled = vae.decode(z), tiling.decode(vae, z, mode="on", tile_size=8)
        want = fresh.decode(z)
    assert (got - want).abs().max() < 1e-5 and (got_tiled - want).abs().max() < 1e-5


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_latent_read_from_a_file_decodes_as_stored(tmp_path, stored):
    """Issue 14 item 5: `vae.decode(vae.denormalize(latent))` on a latent file's tensor (fp16 by default)."""
    from safetensors.torch import load_file

    from latentctl.pipeline import latents

    vae = _tiny(seed=5)
    with torch.inference_mode():
        x = torch.rand(1, 3, 16, 12) * 2 - 1
        latent = vae.normalize(vae.encode(x).mean)
        latents.write(tmp_path / "a.safetensors", {"latent": latent[0].to(stored)}, {"format": latents.FORMAT})
        read = load_file(tmp_path / "a.safetensors")["latent"][None]
        assert read.dtype == stored
        got = vae.decode(vae.denormalize(read))
        want = vae.decode(vae.denormalize(read.float()))  # the same numbers, converted by hand
        assert got.dtype == torch.float32
        # denormalize ran in the stored dtype: one rounding of latent / scale + shift
        tol = 1e-2 if stored == torch.bfloat16 else 2e-3
        assert (got - want).abs().max() < tol
        for dtype in (torch.float16, torch.bfloat16):   # images in any float type encode too
            assert (vae.encode(x.to(dtype)).mean - vae.encode(x.to(dtype).float()).mean).abs().max() < 1e-6


def test_tiled_paths_accept_other_float_types(direct_convs):
    from latentctl import tiling

    vae = _tiny(seed=6)
    with torch.inference_mode():
        z = torch.randn(1, 4, 12, 10, dtype=torch.float16)
        x = (torch.rand(1, 3, 24, 20) * 2 - 1).to(torch.bfloat16)
        assert (tiling.decode(vae, z, mode="on", tile_size=8) - vae.decode(z.float())).abs().max() < 1e-5
        assert (tiling.encode(vae, x, mode="on", tile_size=8).mean - vae.encode(x.float()).mean).abs().max() < 1e-5


# --- the bf16 path: weights held in bf16, chosen by auto where the CPU has bf16 kernels ----------------------------

@pytest.mark.parametrize("kernels", [True, False])
def test_auto_picks_bf16_exactly_when_the_cpu_has_bf16_kernels(monkeypatch, kernels):
    import latentctl
    from latentctl.modules import fastconv, precision

    monkeypatch.setattr(precision, "cpu_has_bf16_kernels", lambda: kernels)
    want = torch.bfloat16 if kernels else torch.float32
    assert latentctl.resolve_dtype("auto", torch.device("cpu")) == want
    vae, _ = latentctl.load("default", dtype="auto")
    assert vae.dtype == want
    for m in vae.modules():  # convolutions in the compute dtype, GroupNorm affines float32 (precision.hold)
        if isinstance(m, torch.nn.Conv2d):
            assert m.weight.dtype == want and m.bias.dtype == want
            # the layout that dtype runs fastest in: NCHW for fp32 when NNPACK serves it, else channels_last
            fmt = torch.contiguous_format if want == torch.float32 and fastconv.nnpack_ready() else torch.channels_last
            assert m.weight.shape[-1] == 1 or m.weight.is_contiguous(memory_format=fmt)
        if isinstance(m, torch.nn.GroupNorm):
            assert m.weight.dtype == torch.float32 and m.bias.dtype == torch.float32
    assert latentctl.resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # explicit choices stand


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_the_probe_is_what_onednn_says_with_torchs_avx512_kernels(capability, monkeypatch):
    from latentctl.modules import precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    want = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (capability == "AVX512" or not x86)
    assert precision.cpu_has_bf16_kernels() == want


def test_auto_runs_under_torchs_avx2_kernels(tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 (how a user brings NNPACK back on an AVX-512 CPU) leaves torch without the kernels
    its bf16 ops need on an AMX CPU (pack_vnni2), so auto must be fp32 there: a real encode in such a process."""
    from PIL import Image

    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "a.png")
    code = ("import sys, torch, latentctl; from latentctl.cli.app import main; "
            "print(latentctl.resolve_dtype('auto', torch.device('cpu')), file=sys.stderr); "
            f"main(['encode', {str(tmp_path / 'a.png')!r}, '-o', {str(tmp_path / 'out')!r}, '-q'])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "a.safetensors").exists()
    if platform.machine().lower() in ("x86_64", "amd64"):   # elsewhere the variable names no kernels of torch's
        assert r.stderr.splitlines()[0] == "torch.float32"


def _photo_batch() -> torch.Tensor:
    """A real photo (scikit-image's coffee, not one of the default model's evaluation photos), 96x128 crop."""
    from skimage import data

    img = data.coffee()[120:216, 200:328]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return x.contiguous(memory_format=torch.channels_last)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], computed here (not latentctl.metrics: an independent formula)."""
    mse = ((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_bf16_weights_match_fp32_and_diffusers_on_a_photo():
    """The default model with its weights held in bf16: roundtrip quality within 0.1 dB of fp32, and the same
    picture as fp32 and as diffusers' AutoencoderKL with the same weights (fp32, and cast to bf16 as users do)."""
    import latentctl
    from latentctl.bench import diffusers_twin

    x = _photo_batch()
    fp32, _ = latentctl.load("default")
    bf16, _ = latentctl.load("default", dtype="bf16")
    twin = diffusers_twin(fp32)
    twin_bf16 = torch.nn.Module.to(diffusers_twin(fp32), dtype=torch.bfloat16)  # (diffusers' .to() logs advice)
    with torch.inference_mode():
        out = {"fp32": fp32.decode(fp32.encode(x).mean).float(), "bf16": bf16.decode(bf16.encode(x).mean).float(),
               "diffusers fp32": twin.decode(twin.encode(x).latent_dist.mean).sample,
               "diffusers bf16": twin_bf16.decode(twin_bf16.encode(x.bfloat16()).latent_dist.mean).sample.float()}
    quality = {k: _psnr(v, x) for k, v in out.items()}
    assert abs(quality["fp32"] - quality["diffusers fp32"]) < 1e-3, quality   # the reference is the same model
    assert abs(quality["bf16"] - quality["fp32"]) < 0.1, quality
    assert quality["bf16"] >= quality["diffusers bf16"] - 0.05, quality        # no worse than a plain bf16 cast
    assert _psnr(out["bf16"], out["fp32"]) > 40, quality
    assert _psnr(out["bf16"], out["diffusers fp32"]) > 40, quality
    assert _psnr(out["bf16"], out["diffusers bf16"]) > 38, quality


def test_pipeline_with_bf16_weights_runs_without_autocast_and_redoes_overflow_in_fp32(tmp_path, monkeypatch):
    """encode_batch with bf16 weights: no autocast (the weights already compute in bf16), the same latent as
    fp32 weights under autocast to bf16 precision; a non-finite batch is redone in fp32 on an fp32 copy."""
    import latentctl
    from latentctl.pipeline import run

    x = _photo_batch()[:, :, :64, :64]
    held, _ = latentctl.load("default", dtype="bf16")
    fp32, _ = latentctl.load("default")
    seen, real_autocast = [], run._autocast

    def autocast(vae, options):
        ctx = real_autocast(vae, options)
        seen.append(ctx._enabled)
        return ctx

    monkeypatch.setattr(run, "_autocast", autocast)
    opts = run.Options(dtype=torch.bfloat16)
    got = run.encode_batch(held, x, opts).mean
    auto = run.encode_batch(fp32, x, opts).mean
    ref = fp32.encode(x).mean.detach()
    assert seen == [False, True]
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got - auto).abs().max() < 0.05 * ref.abs().max()
    # the overflow fallback: fp32 asked of bf16 weights computes in fp32 (weights as held), never in bf16
    exact = latentctl.modules.precision.hold(copy.deepcopy(held), torch.float32)
    redo = run.encode_batch(held, x, run.Options(dtype=torch.float32)).mean
    assert held.dtype == torch.bfloat16 and (redo - exact.encode(x).mean).abs().max() < 1e-5
    assert (redo - got).abs().max() > 1e-3  # and that is not the bf16 result


def test_downsample_takes_the_padded_conv_in_reduced_precision(monkeypatch):
    """The unpadded Downsample (an fp32 speed-up) gave NaN / 7-10% error in bf16 on a Xeon with AMX (oneDNN's bf16
    kernels; the padded conv was right): in bf16, held or under autocast, the padded conv must run."""
    from latentctl.modules import Downsample

    down = Downsample(8)
    calls = []
    real = Downsample.unpadded_forward
    monkeypatch.setattr(Downsample, "unpadded_forward", lambda self, x: calls.append(x.dtype) or real(self, x))
    x = torch.randn(1, 8, 12, 10)
    with torch.inference_mode():
        down(x)
        assert calls == [torch.float32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = down(x)
        held = copy.deepcopy(down).to(torch.bfloat16)
        z = held(x.bfloat16())
    assert calls == [torch.float32]
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias,
                                      stride=2)
    assert (y.float() - want).abs().max() < 0.05 and (z.float() - want).abs().max() < 0.05
