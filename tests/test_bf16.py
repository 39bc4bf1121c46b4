"""Precision: what the model accepts and computes in, and that folded weights follow the weights they come from."""

import copy

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


def test_inplace_reload_also_holds_channels_last_and_tiled():
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


def test_tiled_paths_accept_other_float_types():
    from latentctl import tiling

    vae = _tiny(seed=6)
    with torch.inference_mode():
        z = torch.randn(1, 4, 12, 10, dtype=torch.float16)
        x = (torch.rand(1, 3, 24, 20) * 2 - 1).to(torch.bfloat16)
        assert (tiling.decode(vae, z, mode="on", tile_size=8) - vae.decode(z.float())).abs().max() < 1e-5
        assert (tiling.encode(vae, x, mode="on", tile_size=8).mean - vae.encode(x.float()).mean).abs().max() < 1e-5
