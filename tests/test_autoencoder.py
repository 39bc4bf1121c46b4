"""Our autoencoder is the same network as diffusers' AutoencoderKL, and LDM-layout files are the real layout."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from latentctl.checkpoints import diffusers_to_ldm, load_autoencoder
from latentctl.modules import AEConfig, AttnBlock, AutoencoderKL, Decoder, DiagonalGaussian

LAYOUTS = {
    # (a) the SD layout at reduced width: four levels, two res blocks, mid attention, quant convs
    "sd": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4),
    # (b) the SD3/FLUX layout: 16 latent channels, no quant convs
    "flux": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=16,
                 use_quant_conv=False, use_post_quant_conv=False),
}


def make_diffusers(layout: str, seed: int = 0) -> DiffusersVAE:
    torch.manual_seed(seed)
    kw = LAYOUTS[layout]
    n = len(kw["block_out_channels"])
    vae = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw)
    with torch.no_grad():  # move norms and biases off their init values so every parameter matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "diffusers"
    ref = make_diffusers(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, folder


def images(seed=1, h=64, w=96):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_same_numerics_as_diffusers(pair):
    _, ref, folder = pair
    ours = load_autoencoder(folder)
    x = images()
    with torch.no_grad():
        ref_post, our_post = ref.encode(x).latent_dist, ours.encode(x)
        assert our_post.mean.shape == ref_post.mean.shape
        assert (our_post.mean - ref_post.mean).abs().max() < 1e-4
        assert (our_post.logvar - ref_post.logvar).abs().max() < 1e-4
        z = ref_post.mean
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-4


def test_ldm_layout_files_load_bit_identical(pair, tmp_path):
    _, ref, folder = pair
    base = load_autoencoder(folder)
    ldm = {k: v.contiguous() for k, v in diffusers_to_ldm(ref.state_dict()).items()}
    assert any(k.startswith("encoder.down.0.block.0.") for k in ldm) and "encoder.mid.attn_1.q.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in the original layout
    save_file(ldm, tmp_path / "vae.safetensors")
    wrapped = {"state_dict": {**{f"first_stage_model.{k}": v for k, v in ldm.items()},
                              "model.diffusion_model.out.weight": torch.zeros(1),   # the rest of a full checkpoint
                              "first_stage_model.loss.logvar": torch.zeros(())}}  # training-only entry
    torch.save(wrapped, tmp_path / "sd-full.ckpt")
    x = images(2)
    with torch.no_grad():
        want_mean, want_img = base.encode(x).mean, base.decode(base.encode(x).mean)
        for f in ("vae.safetensors", "sd-full.ckpt"):
            vae = load_autoencoder(tmp_path / f)
            assert torch.equal(vae.encode(x).mean, want_mean), f
            assert torch.equal(vae.decode(want_mean), want_img), f


def test_diffusers_single_file_loader_reads_our_ldm_file(pair, tmp_path):
    """diffusers' own LDM loader (offline, config from the local folder) gives the same network."""
    _, ref, folder = pair
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(ref.state_dict()).items()}, tmp_path / "vae.safetensors")
    other = DiffusersVAE.from_single_file(str(tmp_path / "vae.safetensors"), config=str(folder)).eval()
    x = images(3)
    with torch.no_grad():
        assert (other.encode(x).latent_dist.mean - ref.encode(x).latent_dist.mean).abs().max() < 1e-6
        ours = load_autoencoder(tmp_path / "vae.safetensors")
        assert (ours.encode(x).mean - other.encode(x).latent_dist.mean).abs().max() < 1e-4


def test_decoder_factory_methods_swap_one_part_only():
    kw = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)

    class Marked(torch.nn.Conv2d):
        pass

    class ConvSwap(Decoder):
        def _make_conv(self, in_channels, out_channels, **kwargs):
            return Marked(in_channels, out_channels, **kwargs)

    class NoAttn(Decoder):
        def _make_attn(self, channels):
            return torch.nn.Identity()

    class TembBlocks(Decoder):
        def _make_resblock(self, **kwargs):
            from latentctl.modules import ResnetBlock
            return ResnetBlock(temb_channels=8, **kwargs)

    from latentctl.modules import ResnetBlock

    base = Decoder(**kw)
    names = {n: type(m) for n, m in base.named_modules() if n}
    resblocks = {n for n, m in base.named_modules() if isinstance(m, ResnetBlock)}
    for cls, changed in [(ConvSwap, {"conv_out"}), (NoAttn, {"mid.attn_1"})]:
        other = {n: type(m) for n, m in cls(**kw).named_modules() if n}
        assert {n for n in names if n in other and names[n] is not other[n]} == changed, cls.__name__
        assert {n for n in other if n not in names} <= {f"{c}.{s}" for c in changed for s in ("weight", "bias")}
    # every resblock of the mid and up path gains temb_proj; conv_in, the upsamplers and conv_out do not change
    added = {n for n, _ in TembBlocks(**kw).named_modules() if n and n not in names}
    assert {n.rsplit(".", 1)[0] for n in added} == resblocks and all(n.endswith("temb_proj") for n in added)
    assert isinstance(ConvSwap(**kw).conv_out, Marked)
    assert isinstance(base.mid.attn_1, AttnBlock)


def test_posterior_matches_its_formulas():
    moments = torch.randn(2, 8, 4, 4) * 3
    moments[:, 4:] += torch.tensor([-50.0, 0, 0, 40.0])[None, :, None, None]  # beyond the clamp both ways
    post = DiagonalGaussian(moments)
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar))
    assert torch.equal(post.mode(), moments[:, :4])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(post.sample(g1), post.sample(g2))
    mean, logvar = post.mean, post.logvar
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), kl)
    # Monte Carlo check of the closed form on a small, well-behaved posterior
    small = DiagonalGaussian(torch.cat([torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -1.0)], dim=1))
    s = torch.stack([small.sample(torch.Generator().manual_seed(i)) for i in range(4000)]).flatten()
    assert abs(s.mean().item() - 0.5) < 0.05 and abs(s.var().item() - torch.exp(torch.tensor(-1.0)).item()) < 0.05


def test_latent_normalisation_round_trips():
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.3611, shift_factor=0.1159))
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(vae.normalize(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6)


def test_subpixel_upsample_equals_nearest_then_conv():
    """Inference runs Upsample as four 2x2 phase convolutions; it must equal nearest x2 + 3x3 conv."""
    import torch.nn.functional as F

    from latentctl.modules import Upsample

    up = Upsample(32)
    x = torch.randn(2, 32, 7, 11)
    with torch.no_grad():
        want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            got = up(inp)
            assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    x.requires_grad_(True)
    assert torch.equal(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))  # training path unchanged


@pytest.mark.parametrize("h,w", [(16, 16), (17, 16), (16, 17), (17, 17), (3, 4), (2, 2)])
def test_unpadded_downsample_equals_pad_then_conv(h, w):
    """Inference runs Downsample without the padded copy of its input; it must equal the original pad + conv."""
    import torch.nn.functional as F

    from latentctl.modules import Downsample

    torch.manual_seed(0)
    down = Downsample(8)
    x = torch.randn(2, 8, h, w)
    want = down.conv(F.pad(x, (0, 1, 0, 1)))
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            got = down(inp)
            assert got.shape == want.shape and (got - want).abs().max() < 1e-6


@pytest.mark.slow
def test_torch_compile_traces_each_half_as_one_graph(pair, direct_convs):
    """torch.compile sees encoder and decoder whole (no graph break: a break makes it recompile per block and
    fall back to eager), and the traced graph computes what eager does (eager on oneDNN like the trace: NNPACK's
    Winograd, which a trace never takes, rounds differently, tests/test_fastconv.py)."""
    _, _, folder = pair
    vae = load_autoencoder(folder).eval()
    x = images(h=32, w=32)
    with torch.no_grad():
        z = vae.encode(x).mode()
        vae.decode(z)  # eager first, as a benchmark would: module state it leaves (caches) must not break tracing
        for half, inp in ((vae.encoder, x), (vae.decoder, z)):
            report = torch._dynamo.explain(half)(inp)
            assert report.graph_break_count == 0, [b.reason.splitlines()[0] for b in report.break_reasons]
            traced = torch.compile(half, backend="eager")  # dynamo's graph run by eager kernels: no C++ build
            assert (traced(inp) - half(inp)).abs().max() < 1e-5
