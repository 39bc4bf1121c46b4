"""Tiled encode/decode: same shapes, same numbers as untiled, and the auto decision is exactly estimate > budget.

Tiny models and images keep this file to a few seconds; benchmarks/tiling.py measures real sizes.
"""

import pytest
import torch
from conftest import make_tiny_vae

from latentctl import tiling
from latentctl.errors import UsageError
from latentctl.modules import AutoencoderKL
from latentctl.modules.attention import AttnBlock
from latentctl.modules.autoencoder import Decoder
from latentctl.spill import SpilledTensor

# Tiled against untiled to 1e-5: both on direct convolutions (conftest.direct_convs; with NNPACK's Winograd the two
# differ by its rounding, bounded in tests/test_fastconv.py).
pytestmark = pytest.mark.usefixtures("direct_convs")

def tiny(seed: int = 0, **kw) -> AutoencoderKL:
    """Factor 8, parameters moved off their init values (so that norms and biases matter)."""
    return make_tiny_vae(seed, jitter=0.05, **{"ch_mult": (1, 2, 2, 2), **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiles of tiny models are far too small to share between threads; on a busy runner every op would wait
    at the thread barrier instead (measured 30x slower with 2 threads on an oversubscribed machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae():
    return tiny()


def image(h=75, w=101, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def latent(h=11, w=13, b=2, c=4, seed=2):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def psnr(a, b):
    """Decoded images in [-1, 1] compared as [0, 1] pictures."""
    a, b = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


# --- tiling never changes shapes, and every pixel lands where untiled puts it ------------------------------------

@pytest.mark.parametrize("h,w", [(75, 101), (64, 64), (17, 9)])
@pytest.mark.parametrize("tile", [24, 48, 1000])
def test_encode_matches_untiled_any_size_and_tile(vae, h, w, tile):
    x = image(h, w)
    with torch.no_grad():
        ref = vae.encode(x)
        got = tiling.tiled_encode(vae, x, tile_size=tile, budget=1 << 40)
    assert got.mean.shape == ref.mean.shape and got.logvar.shape == ref.logvar.shape
    assert rel_l2(got.mean, ref.mean) < 1e-5       # required: <= 1%; exact statistics give float precision
    assert (got.mean - ref.mean).abs().max() < 1e-4


@pytest.mark.parametrize("h,w", [(11, 13), (8, 8), (3, 5)])
@pytest.mark.parametrize("tile", [24, 56, 1000])
def test_decode_matches_untiled_any_size_and_tile(vae, h, w, tile):
    z = latent(h, w)
    with torch.no_grad():
        ref = vae.decode(z)
        got = tiling.tiled_decode(vae, z, tile_size=tile, budget=1 << 40)
    assert got.shape == ref.shape
    assert psnr(got, ref) > 90                   # required: >= 45 dB
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.slow
def test_tight_budget_recomputes_statistics_and_stays_exact(vae):
    """A budget too small to hold full-resolution activations: GroupNorm statistics inside streamed segments
    come from passes over all tiles, and the result still matches untiled."""
    z, x = latent(), image()
    budget = 600_000
    p = tiling.plan(vae, z.shape, "decode", mode="on", budget=budget, tile_size=32, spill=False)
    assert p.cost_ratio > 1.2 and p.spill_over is None     # recomputation happened
    streamed = [s for s in p.segments if s.kind == "tiles"]
    assert any(vae_norms_inside(vae, "decode", z.shape, s) for s in streamed)
    with torch.no_grad():
        ref_img, ref_lat = vae.decode(z), vae.encode(x).mean
        got_img = tiling.tiled_decode(vae, z, tile_plan=p)
        got_lat = tiling.tiled_encode(vae, x, tile_size=32, budget=budget, spill=False).mean
    assert psnr(got_img, ref_img) > 90
    assert rel_l2(got_lat, ref_lat) < 1e-5


def test_spill_files_replace_recomputation_and_stay_exact(vae, tmp_path, monkeypatch):
    """The same tight budget with a spill folder: whole activations go to files instead of being recomputed,
    the plan is cheaper, the result is still untiled's, and no file is ever visible in the folder."""
    made, listed = [], []

    class Counted(SpilledTensor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.nbytes)

    monkeypatch.setattr(tiling.running, "SpilledTensor", Counted)
    z, x = latent(), image()
    kw = dict(mode="on", budget=600_000, tile_size=32)
    recompute = tiling.plan(vae, z.shape, "decode", spill=False, **kw)
    p = tiling.plan(vae, z.shape, "decode", spill=tmp_path, **kw)
    assert p.spill_over is not None and "spilled to" in p.describe()
    assert p.cost_ratio < tiling.SPILL_WORTH * recompute.cost_ratio
    with torch.no_grad():
        got = tiling.tiled_decode(vae, z, tile_plan=p, progress=lambda *_: listed.append(list(tmp_path.iterdir())))
        assert psnr(got, vae.decode(z)) > 90
    assert made and max(made) <= max(s.spilled for s in p.segments)
    assert not any(listed) and not list(tmp_path.iterdir())      # unlinked at creation: nothing to leak
    pe = tiling.plan(vae, (2, 3, 150, 200), "encode", spill=tmp_path, mode="on", budget=400_000, tile_size=32)
    x = image(150, 200)
    with torch.no_grad():
        assert rel_l2(tiling.tiled_encode(vae, x, tile_plan=pe).mean, vae.encode(x).mean) < 1e-5


def test_no_spill_without_disk_space(vae, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling.budget, "free_bytes", lambda folder: 0)
    p = tiling.plan(vae, latent().shape, "decode", mode="on", budget=600_000, tile_size=32, spill=tmp_path)
    assert p.spill_over is None and p.cost_ratio > 1.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_tensor_reads_and_writes_regions(tmp_path, dtype):
    g = torch.Generator().manual_seed(6)
    ref = torch.zeros(2, 5, 13, 17, dtype=dtype)
    t = SpilledTensor(ref.shape, dtype, "cpu", tmp_path)
    for y0, y1, x0, x1 in [(0, 13, 0, 17), (2, 9, 3, 11), (12, 13, 0, 17), (0, 4, 16, 17)]:
        value = torch.randn(2, 5, y1 - y0, x1 - x0, generator=g).to(dtype)
        t[:, :, y0:y1, x0:x1] = value
        ref[:, :, y0:y1, x0:x1] = value
    assert torch.equal(t[:, :, :, :], ref)
    assert torch.equal(t[:, :, 1:12, 5:6], ref[:, :, 1:12, 5:6])
    with pytest.raises(IndexError):
        t[0]
    t.close()


def vae_norms_inside(vae, what, shape, seg):
    ops = tiling.encoder_ops(vae) if what == "encode" else tiling.decoder_ops(vae)
    return any(ops[k].kind == "norm" for k in range(seg.a + 1, seg.b))


def test_budget_nothing_fits_still_runs_and_says_so(vae):
    z = latent()
    p = tiling.plan(vae, z.shape, "decode", mode="on", budget=1000, tile_size=40)
    assert not p.fits and "OVER BUDGET" in p.describe()
    with torch.no_grad():
        assert psnr(tiling.tiled_decode(vae, z, tile_plan=p), vae.decode(z)) > 90


def test_planner_holds_within_budget(vae):
    """Every budget from just above the least memory any cut needs to unlimited: the plan fits, its predicted peak
    is within the budget, and more room never costs more computation. (Real memory: test_promises.py.)"""
    shape = (2, 3, 150, 200)
    floor = tiling.plan(vae, shape, "encode", mode="on", budget=1000).peak     # the cut needing least memory
    assert not tiling.plan(vae, shape, "encode", mode="on", budget=floor - 1).fits
    budgets = [floor + floor // 20, 12_000_000, 20_000_000, 1 << 40]
    plans = [tiling.plan(vae, shape, "encode", mode="on", budget=b) for b in budgets]
    for budget, p in zip(budgets, plans):
        assert p.fits and p.peak <= budget, (budget, p.describe())
    costs = [p.cost_ratio for p in plans]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1], costs
    assert plans[-1].cost_ratio < 1.05                 # with room, no recomputation


# --- auto tiles exactly when the estimate exceeds the budget -----------------------------------------------------

def test_should_tile_modes():
    assert tiling.should_tile("on", 1, 10) and not tiling.should_tile("off", 10, 1)
    assert tiling.should_tile("auto", 11, 10) and not tiling.should_tile("auto", 10, 10)
    with pytest.raises(UsageError):
        tiling.should_tile("sometimes", 1, 1)


def test_auto_tiles_exactly_above_the_estimate(vae):
    shape = (1, 4, 40, 40)
    est = tiling.estimate_memory(vae, shape, "decode")
    assert not tiling.plan(vae, shape, "decode", mode="auto", budget=est).tile
    assert tiling.plan(vae, shape, "decode", mode="auto", budget=est - 1).tile
    assert tiling.plan(vae, shape, "decode", mode="on", budget=1 << 40).tile
    assert not tiling.plan(vae, shape, "decode", mode="off", budget=1).tile


def test_auto_decides_and_dispatches(vae):
    z = latent()
    est = tiling.estimate_memory(vae, z.shape, "decode")
    for budget, tiled in ((est, False), (est // 4, True)):
        report = {}
        with torch.no_grad():
            out = tiling.decode(vae, z, mode="auto", budget=budget, report=report)
            assert report["tiled"] is tiled
            assert psnr(out, vae.decode(z)) > 90


def test_a_cpu_batch_runs_one_image_at_a_time_with_the_batch_result(vae):
    """On a CPU tiling.encode/decode (what the pipeline and bench call) feed the model one image at a time once an
    image's full-resolution activation reaches tiling.SPLIT_BYTES (faster there), and small images as one batch;
    the result is the whole batch's, each image planned on its own."""
    x, z = image(96, 96, b=3), latent(12, 12, b=3)   # 32 channels x 96 x 96 x 4 bytes: just over 1 MiB
    assert 32 * 96 * 96 * 4 >= tiling.SPLIT_BYTES > 32 * 64 * 64 * 4
    seen = []
    hooks = [half.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
             for half in (vae.encoder, vae.decoder)]
    try:
        with torch.no_grad():
            tiling.encode(vae, image(64, 64, b=3), mode="off"), tiling.decode(vae, latent(8, 8, b=3), mode="off")
            assert seen == [3, 3]
            seen.clear()
            got_e, got_d = tiling.encode(vae, x, mode="off"), tiling.decode(vae, z, mode="off")
            assert seen == [1] * 6
            want_e, want_d = vae.encode(x), vae.decode(z)
            assert seen[6:] == [3, 3]
            budget = tiling.estimate_memory(vae, z[:1].shape, "decode")  # one image fits untiled, three would not
            report = {}
            assert psnr(tiling.decode(vae, z, mode="auto", budget=budget, report=report), want_d) > 90
            assert report["tiled"] is False
    finally:
        for h in hooks:
            h.remove()
    assert (got_e.mean - want_e.mean).abs().max() < 1e-5 and (got_e.logvar - want_e.logvar).abs().max() < 1e-5
    assert got_d.shape == want_d.shape and (got_d - want_d).abs().max() < 1e-5


def test_estimate_grows_with_pixels_and_precision(vae):
    small = tiling.estimate_memory(vae, (1, 3, 128, 128), "encode")
    big = tiling.estimate_memory(vae, (1, 3, 256, 256), "encode")
    assert 3.5 < big / small < 4.5
    half = tiling.estimate_memory(vae, (1, 3, 256, 256), "encode", dtype=torch.bfloat16)
    assert half * 2 == pytest.approx(big, rel=0.01)


def test_default_budget_is_positive_and_below_free_memory():
    b = tiling.default_budget("cpu")
    assert 0 < b <= tiling.budget._mem_available()


def test_bad_arguments(vae):
    with pytest.raises(UsageError):
        tiling.plan(vae, (1, 4, 8, 8), "decode", tile_size=0)
    with pytest.raises(UsageError):
        tiling.plan(vae, (1, 4, 8, 8), "roundtrip")
    with pytest.raises(UsageError):
        tiling.plan(vae, (1, 4, 8, 8), "decode", budget=-5)


# --- other architectures -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(z_channels=16, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False),   # SD3 / FLUX layout
    dict(mid_attn="none"),                                                                 # CogView4 layout
    dict(attn_resolutions=(32,), resolution=64),     # attention inside a level: global, on a held tensor
    dict(attn_window=3),                             # attention on 3x3-latent tiles (the default model: 32)
])
def test_other_layouts_match(kw):
    vae = tiny(seed=3, **kw)
    x = image(40, 56)
    with torch.no_grad():
        ref = vae.encode(x).mean
        got = tiling.tiled_encode(vae, x, tile_size=16, budget=1 << 40).mean
        assert rel_l2(got, ref) < 1e-5
        z = ref[:, :vae.config.latent_channels]
        assert psnr(tiling.tiled_decode(vae, z, tile_size=24, budget=400_000), vae.decode(z)) > 90


def test_resampling_without_convs_matches():
    vae = tiny(seed=4)
    for level in vae.encoder.down[:-1]:
        level.downsample.with_conv = False       # average pooling
    for level in vae.decoder.up[1:]:
        level.upsample.with_conv = False         # plain nearest upsampling
    x = image(45, 38)
    with torch.no_grad():
        assert rel_l2(tiling.tiled_encode(vae, x, tile_size=16).mean, vae.encode(x).mean) < 1e-5
        z = latent(6, 7)
        assert psnr(tiling.tiled_decode(vae, z, tile_size=16), vae.decode(z)) > 90


def test_attention_in_query_chunks_is_the_same():
    torch.manual_seed(5)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        whole = block(x)
        chunked = tiling.attention._global_attention(block, x, room=x.numel() * 4 * 3)   # forces query chunks
    assert (whole - chunked).abs().max() < 1e-5


def test_unknown_layer_is_refused():
    class OddDecoder(Decoder):
        def _make_resblock(self, **kwargs):
            return torch.nn.Identity()

    vae = tiny()
    vae.decoder = OddDecoder(ch=32, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4)
    with pytest.raises(tiling.TilingUnsupported):
        tiling.plan(vae, (1, 4, 8, 8), "decode", mode="on")


def test_progress_and_report(vae):
    z = latent()
    seen, report = [], {}
    p = tiling.plan(vae, z.shape, "decode", mode="on", budget=600_000, tile_size=32)
    with torch.no_grad():
        tiling.tiled_decode(vae, z, tile_plan=p, progress=lambda done, total: seen.append((done, total)),
                            report=report)
    assert seen[-1] == (p.steps, p.steps) and report["steps"] == p.steps and report["tiled"]


def test_plan_for_another_shape_is_refused(vae):
    p = tiling.plan(vae, (1, 4, 8, 8), "decode", mode="on")
    with pytest.raises(UsageError):
        tiling.tiled_decode(vae, latent(9, 9, b=1), tile_plan=p)
