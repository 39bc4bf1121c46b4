"""Decoder norms with fixed statistics (FixedGroupNorm, the default-model-v2 issue): calibrated on an image they
decode it as nn.GroupNorm does (the reference), they keep the input's magnitude, and the library loads, tiles and
holds them in reduced precision like any other layer. The calibration is scripts/train_default.py's."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_vae, save_weights

import latentctl
from latentctl import tiling
from latentctl.bench import diffusers_twin
from latentctl.checkpoints import infer_config
from latentctl.errors import UsageError
from latentctl.modules import AutoencoderKL, FixedGroupNorm
from latentctl.modules.blocks import fix_norms
from latentctl.modules.precision import hold


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: threads would only wait at each op's barrier on a busy runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer():
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrated(seed: int = 3) -> tuple[AutoencoderKL, torch.Tensor, torch.Tensor]:
    """A tiny factor-8 model, its decoder's norms fixed to the statistics of one image x, and the decode of x by
    the same weights with nn.GroupNorm (the reference)."""
    vae = make_tiny_vae(seed, jitter=0.05, ch_mult=(1, 2, 2, 2))
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).mean)
        fixed = fix_norms(vae.decoder)
        trainer().calibrate(vae, fixed, x)
    vae.config.decoder_norm = "fixed"
    return vae, x, ref


def test_fixed_norms_calibrated_on_an_image_decode_it_as_groupnorm_does():
    vae, x, ref = calibrated()
    assert not any(type(m) is torch.nn.GroupNorm for m in vae.decoder.modules())
    assert any(type(m) is torch.nn.GroupNorm for m in vae.encoder.modules())   # the encoder is left alone
    with torch.no_grad():
        out = vae.decode(vae.encode(x).mean)
    assert (out - ref).abs().max() < 1e-4


def test_a_fixed_norm_keeps_magnitude_which_groupnorm_discards():
    gn = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(gn.weight)
    fixed = FixedGroupNorm(4, 8)
    fixed.load_state_dict(gn.state_dict(), strict=False)
    fixed.fixed_mean.normal_()
    fixed.fixed_var.uniform_(0.5, 2)
    h = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        assert torch.allclose(gn(3 * h), gn(h), atol=1e-4)                         # per-image statistics
        zero = fixed(torch.zeros_like(h))
        assert torch.allclose(fixed(3 * h) - zero, 3 * (fixed(h) - zero), atol=1e-5)  # an affine map
        assert not torch.allclose(fixed(3 * h), fixed(h), atol=1e-2)
        want = (h - fixed.fixed_mean.view(1, -1, 1, 1)) / torch.sqrt(fixed.fixed_var.view(1, -1, 1, 1) + fixed.eps) \
            * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)           # the formula
        assert torch.allclose(fixed(h), want, atol=1e-6)


def test_weights_with_fixed_statistics_load_as_such(tmp_path):
    """The loader infers decoder_norm = fixed from the saved statistics and rebuilds the same function."""
    vae, x, ref = calibrated()
    path = save_weights(vae, tmp_path / "fixed.safetensors", scaling_factor=1.0)
    sd = vae.state_dict()
    assert infer_config(sd).decoder_norm == "fixed"
    assert infer_config({k: v for k, v in sd.items() if "fixed_" not in k}).decoder_norm == "group"
    loaded, _ = latentctl.load(weights=path, device="cpu", dtype="fp32")
    assert loaded.config.decoder_norm == "fixed"
    assert sum(type(m) is FixedGroupNorm for m in loaded.decoder.modules()) == \
        sum(type(m) is FixedGroupNorm for m in vae.decoder.modules())
    with torch.no_grad():
        out = loaded.decode(loaded.encode(x).mean)
    assert (out - ref).abs().max() < 1e-4


def test_tiled_decode_treats_fixed_norms_as_pointwise(direct_convs):
    vae, _, _ = calibrated()
    ops = tiling.ops.decoder_ops(vae)
    assert not any(op.kind == "norm" for op in ops) and sum(op.kind == "affine" for op in ops) >= 5
    z = torch.randn(1, 4, 11, 13, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vae.decode(z)
        got = tiling.tiled_decode(vae, z, tile_size=24, budget=1 << 40)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


def test_held_in_bf16_a_fixed_norm_stays_bf16_and_errs_as_groupnorm_does():
    """No float32 round trip between layers: the fixed norm's output keeps the activations' dtype; and its bf16
    error is of the order of the same weights' with nn.GroupNorm (the reference)."""
    vae, _, _ = calibrated()
    group = make_tiny_vae(3, jitter=0.05, ch_mult=(1, 2, 2, 2))   # the same weights, per-image statistics
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    errors = []
    with torch.no_grad():
        for model in (vae, group):
            want = model.decode(z)
            hold(model, torch.bfloat16, torch.contiguous_format)
            got = model.decode(z)
            errors.append(float((got.float() - want).abs().mean() / want.abs().mean()))
        dtypes = []
        hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
                 for m in vae.decoder.modules() if type(m) is FixedGroupNorm]
        vae.decode(z)
    for h in hooks:
        h.remove()
    assert len(dtypes) >= 5 and set(dtypes) == {torch.bfloat16}
    assert errors[0] < 1.5 * errors[1], errors


def test_diffusers_has_no_fixed_norm_twin():
    vae, _, _ = calibrated()
    with pytest.raises(UsageError, match="fixed statistics"):
        diffusers_twin(vae)
