"""`latentctl bench` and its library: row schema, unavailable backends, FLOP counts, the diffusers twin, memory."""

import time

import pytest
import torch
from conftest import TINY, json_lines, make_tiny_vae
from typer.testing import CliRunner

from latentctl import bench
from latentctl.cli.app import app
from latentctl.errors import UsageError
from latentctl.flops import model_flops
from latentctl.modules import AEConfig, AutoencoderKL, fastconv, precision
from latentctl.registry import get_entry

TINY_TOML = """
[tiny]
description = "two levels, 32/64 wide: the smallest model with every kind of layer"
ch = 32
ch_mult = [1, 2]
num_res_blocks = 1
z_channels = 4
quant_conv = true
mid_attn = "vanilla"
"""
ROW_TYPES = {"what": str, "attn": str, "dtype": str, "size": int, "batch": int, "status": str,
             "images_per_s": float, "ms_per_image": float, "ms_per_image_min": float, "ms_per_image_max": float,
             "peak_mem_mb": float, "act_mem_mb": float, "gflop_per_image": float, "gflops": float,
             "memory_format": str, "device": str, "threads": int, "repeat": int, "model": str}


@pytest.fixture
def tiny_models(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(TINY_TOML)
    return path


def tiny_vae() -> AutoencoderKL:
    return make_tiny_vae()


def test_json_rows_schema_and_unavailable_backend(tiny_models):
    """--json gives one object per line with every key; xformers (no CUDA here) is one `unavailable` row with
    its reason and the other backends still run."""
    args = ["bench", "--models", str(tiny_models), "--model", "tiny", "--random-weights", "--size", "32",
            "--batch", "2", "--attn", "sdpa,xformers,linear", "--what", "encode,decode", "--repeat", "1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json_lines(res.stdout)
    assert all(tuple(r) == bench.ROW_KEYS for r in rows)
    if not torch.cuda.is_available():
        (skipped,) = [r for r in rows if r["status"] != "ok"]
        assert skipped["attn"] == "xformers" and skipped["status"] == "unavailable"
        assert "xformers" in skipped["reason"] and "--attn sdpa" in skipped["reason"]
        assert "unavailable: attn=xformers" in res.stderr
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["attn"], r["what"], r["batch"]) for r in ok} == {
        (a, w, 2) for a in ("sdpa", "linear") for w in ("encode", "decode")}
    for r in ok:
        for key, kind in ROW_TYPES.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["ms_per_image_min"] <= r["ms_per_image"] <= r["ms_per_image_max"]
        assert r["images_per_s"] == pytest.approx(1000 / r["ms_per_image"], rel=0.01)
        assert r["vs_diffusers"] is None and r["reason"] is None
    # the table (stderr) says which mode ran: by default the layout encode/decode use at that dtype on a CPU,
    # NCHW for fp32 when NNPACK serves its convolutions, else channels_last (modules/precision.py)
    auto = torch.bfloat16 if precision.cpu_has_bf16_kernels() else torch.float32  # --dtype auto (test_bf16.py)
    fmt = "contiguous" if auto == torch.float32 and fastconv.nnpack_ready() else "channels_last"
    assert {r["memory_format"] for r in ok} == {fmt}
    assert f"mode: {bench.DTYPE_NAMES[auto]} {fmt}" in " ".join(res.stderr.split())


def test_only_unavailable_backends_exit_2_with_one_line(tiny_models, cli):
    """`--attn xformers` on a machine without it stops before any work: exit 2, one line on stderr."""
    if torch.cuda.is_available():
        pytest.skip("this machine may run xformers")
    res = cli("bench", "--models", tiny_models, "--model", "tiny", "--random-weights", "--attn", "xformers",
              timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --attn xformers: xformers"), res.stderr
    assert "--attn sdpa" in lines[0]


def test_run_reports_unavailable_dtype_and_validates_sizes():
    vae = tiny_vae()
    rows = bench.run(vae, whats=("decode",), dtypes=("fp16", "fp32"), sizes=(16,), repeat=1)
    assert [(r["dtype"], r["status"]) for r in rows] == [("fp16", "unavailable"), ("fp32", "ok")]
    with pytest.raises(UsageError, match="multiple of 2"):
        bench.run(vae, sizes=(15,))


def conv(cin: int, cout: int, k: int, pixels: int) -> int:
    return 2 * cin * cout * k * k * pixels  # 2 FLOPs per multiply-add


def attention(c: int, n: int, backend: str) -> int:
    projections = 4 * 2 * n * c * c  # q, k, v, proj_out: 1x1 convs
    return projections + (4 * n * c * c if backend == "linear" else 4 * n * n * c)


@pytest.mark.parametrize("backend", ["sdpa", "linear"])
def test_flops_match_a_hand_count(backend):
    """TINY at 16x16, layer by layer (GroupNorm, swish, resampling and bias adds are not counted)."""
    hi, lo = 16 * 16, 8 * 8
    resblock = lambda cin, cout, px: conv(cin, cout, 3, px) + conv(cout, cout, 3, px) + (  # noqa: E731
        conv(cin, cout, 1, px) if cin != cout else 0)
    mid = 2 * resblock(64, 64, lo) + attention(64, lo, backend)
    encode = (conv(3, 32, 3, hi) + resblock(32, 32, hi) + conv(32, 32, 3, lo)  # level 0 and its downsample
              + resblock(32, 64, lo) + mid + conv(64, 8, 3, lo) + conv(8, 8, 1, lo))  # level 1, mid, out, quant
    decode = (conv(4, 4, 1, lo) + conv(4, 64, 3, lo) + mid  # post_quant_conv, conv_in, mid
              + 2 * resblock(64, 64, lo) + conv(64, 64, 3, hi)  # level 1 (2 blocks), upsample conv at 16x16
              + resblock(64, 32, hi) + resblock(32, 32, hi) + conv(32, 3, 3, hi))  # level 0, conv_out
    cfg = AEConfig(**TINY)
    assert model_flops(cfg, "encode", 16, backend) == encode
    assert model_flops(cfg, "decode", 16, backend) == decode
    assert model_flops(cfg, "decode", 16, backend, batch=3) == 3 * decode


def test_sd_vae_flops_match_the_published_figures():
    """The performance issue's figures for the SD VAE at 512x512: 1.12 TFLOP encode, 2.51 TFLOP decode."""
    cfg = get_entry("sd15").config()
    assert model_flops(cfg, "encode", 512) / 1e12 == pytest.approx(1.12, abs=0.005)
    assert model_flops(cfg, "decode", 512) / 1e12 == pytest.approx(2.51, abs=0.005)
    assert model_flops(cfg, "decode", 512, "xformers") == model_flops(cfg, "decode", 512, "sdpa")


def test_diffusers_twin_has_our_weights_and_outputs():
    """The weights reach diffusers through the inverse of the loader's name table; outputs agree to 1e-4."""
    pytest.importorskip("diffusers")
    from latentctl.checkpoints import diffusers_to_ldm

    vae = tiny_vae()
    twin = bench.diffusers_twin(vae)
    ours = vae.state_dict()
    back = diffusers_to_ldm(dict(twin.state_dict()))
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(twin.encode(x).latent_dist.mean, vae.encode(x).mean, atol=1e-4, rtol=0)
        z = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(twin.decode(z).sample, vae.decode(z), atol=1e-4, rtol=0)


def test_diffusers_twin_is_nchw_whatever_our_layout():
    """diffusers as people load it: a channels_last latentctl model must not hand its strides to the reference
    (load_state_dict(assign=True) keeps them), which would time diffusers in oneDNN's faster layout."""
    pytest.importorskip("diffusers")
    vae = torch.nn.Module.to(tiny_vae(), memory_format=torch.channels_last)
    assert bench.memory_format(vae) == "channels_last"
    twin = bench.diffusers_twin(vae)
    assert bench.memory_format(twin) == "contiguous"
    assert all(p.is_contiguous() for p in twin.parameters())


def test_vs_diffusers_rows_carry_the_ratio():
    pytest.importorskip("diffusers")
    rows = bench.run(tiny_vae(), whats=("decode",), dtypes=("fp32",), sizes=(16,), repeat=2, vs_diffusers=True)
    (row,) = rows
    assert row["vs_diffusers"] > 0 and row["diffusers_images_per_s"] > 0
    assert row["diffusers_max_abs_diff"] < 1e-4


def test_rss_peak_sees_a_short_allocation():
    if bench._rss_bytes() is None:
        pytest.skip("no /proc/self/statm on this system")
    with bench.RssPeak() as meter:
        meter.reset()
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.02)  # 20 sampling periods: a loaded 2-core runner can hold the sampler off for a few
        del big
        peak, start = meter.read()
    assert peak - start >= 60 * 2**20
