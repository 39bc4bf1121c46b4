"""scripts/train_default.py's decoder-norm experiment (the default-model-v2 issue): FixedGroupNorm, calibrated on an
image, decodes that image as nn.GroupNorm does (the reference), and unlike GroupNorm it keeps the input's magnitude."""

import importlib.util
from pathlib import Path

import torch
from conftest import make_tiny_vae


def trainer():
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixed_norms_calibrated_on_an_image_decode_it_as_groupnorm_does():
    t = trainer()
    vae = make_tiny_vae(3, jitter=0.05).eval()
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).mean)
        fixed = t.fix_decoder_norms(vae)
        assert len(fixed) >= 3 and not any(type(m) is torch.nn.GroupNorm for m in vae.decoder.modules())
        assert any(type(m) is torch.nn.GroupNorm for m in vae.encoder.modules())   # the encoder is left alone
        t.calibrate(vae, fixed, x)
        out = vae.decode(vae.encode(x).mean)
    assert (out - ref).abs().max() < 1e-4


def test_a_fixed_norm_keeps_magnitude_which_groupnorm_discards():
    t = trainer()
    gn = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(gn.weight)
    fixed = t.FixedGroupNorm(gn)
    fixed.fixed_mean.normal_()
    fixed.fixed_var.uniform_(0.5, 2)
    h = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        assert torch.allclose(gn(3 * h), gn(h), atol=1e-4)                         # per-image statistics
        zero = fixed(torch.zeros_like(h))
        assert torch.allclose(fixed(3 * h) - zero, 3 * (fixed(h) - zero), atol=1e-5)  # an affine map
        assert not torch.allclose(fixed(3 * h), fixed(h), atol=1e-2)
