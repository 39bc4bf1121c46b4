"""encode / decode / roundtrip end to end, through the CLI: small random-weight VAEs, real photos from
scikit-image, bad files made here. Most runs are in-process (main(argv)); the ones that need a real process
(a terminal on stderr, SIGINT, SIGKILL) use `python -m latentctl`."""

import hashlib
import io
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import json_lines, make_tiny_vae, run_main, save_weights
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data

from latentctl import load
from latentctl.pipeline import Options, decode_files, encode_files, plan_decode, plan_encode, run
from latentctl.pipeline.latents import FORMAT

SCALE, SHIFT = 0.5, 0.1


def _weights(folder: Path, seed: int = 0, **config) -> Path:
    return save_weights(make_tiny_vae(seed, **config), folder / "vae.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny: factor 2, scale 0.5 / shift 0.1 (from config.json beside it); f8: factor 8; c8: 8 latent channels
    (both with a config.json saying scale 1, shift 0)."""
    root = tmp_path_factory.mktemp("models")
    tiny = _weights(root / "tiny")
    (root / "tiny" / "config.json").write_text(json.dumps({"scaling_factor": SCALE, "shift_factor": SHIFT}))
    f8, c8 = _weights(root / "f8", ch_mult=(1, 1, 1, 1)), _weights(root / "c8", z_channels=8, embed_dim=8)
    for folder in (root / "f8", root / "c8"):  # raw latents: weights need a stated scale to be encoded with
        (folder / "config.json").write_text(json.dumps({"scaling_factor": 1.0, "shift_factor": 0.0}))
    return {"tiny": tiny, "f8": f8, "c8": c8}


def _save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def _photo(name: str, size) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).resize(size, Image.LANCZOS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos in every awkward form: odd size, grayscale, RGBA, 16-bit, CMYK, EXIF-rotated, palette, LA."""
    d = tmp_path_factory.mktemp("photos")
    _save(_photo("chelsea", (61, 47)), d / "odd.png")
    _save(_photo("camera", (40, 30)), d / "gray.png")
    rgba = np.asarray(_photo("astronaut", (36, 28)).convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, 36, dtype=np.uint8)[None, :]
    _save(Image.fromarray(rgba, "RGBA"), d / "rgba.png")
    deep = (np.asarray(_photo("camera", (30, 22)), np.uint16) * 257)
    _save(Image.fromarray(deep), d / "deep.png")  # I;16
    _save(_photo("coffee", (44, 30)).convert("CMYK"), d / "cmyk.jpg", quality=95)
    rotated = _photo("astronaut", (40, 24))
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated: 24 wide, 40 high
    _save(rotated, d / "rotated.jpg", exif=exif, quality=95)
    _save(_photo("coffee", (32, 32)).convert("P"), d / "sub" / "palette.gif")
    _save(_photo("chelsea", (26, 20)).convert("LA"), d / "sub" / "la.png")
    return d


# Displayed size and pillow mode of each photo above.
EXPECTED = {"odd": ((61, 47), "RGB"), "gray": ((40, 30), "L"), "rgba": ((36, 28), "RGBA"),
            "deep": ((30, 22), "I;16"), "cmyk": ((44, 30), "CMYK"), "rotated": ((24, 40), "RGB"),
            "sub/palette": ((32, 32), "P"), "sub/la": ((26, 20), "LA")}


def _meta(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --- what encode writes, and that encode + decode == roundtrip -----------------------------------------------

def test_encode_decode_equals_roundtrip_for_every_kind_of_image(photos, models, tmp_path, capsys, monkeypatch):
    lat, dec, rt = tmp_path / "lat", tmp_path / "dec", tmp_path / "rt"
    code, out, err = run_main(capsys, "encode", photos, "-o", lat, "-w", models["tiny"], "--json")
    assert code == 0, err
    records = json_lines(out)
    assert sorted(r["input"] for r in records) == sorted(str(photos / f) for f in (
        "odd.png", "gray.png", "rgba.png", "deep.png", "cmyk.jpg", "rotated.jpg", "sub/palette.gif", "sub/la.png"))
    assert {r["status"] for r in records} == {"ok"} and all(r["seconds"] > 0 for r in records)
    by_input = {Path(r["input"]).relative_to(photos).with_suffix("").as_posix(): r for r in records}
    for name, ((w, h), mode) in EXPECTED.items():
        source = next(photos.glob(name + ".*"))
        meta, tensors = _meta(lat / f"{name}.safetensors")
        assert by_input[name]["output"] == str(lat / f"{name}.safetensors")
        assert by_input[name]["shape"] == list(tensors["latent"].shape)  # the `shape` key: what was written
        assert tensors["latent"].shape == (4, -(-h // 2), -(-w // 2)) and tensors["latent"].dtype == torch.float16
        assert set(tensors) == {"latent"}
        assert (meta["width"], meta["height"], meta["color_mode"]) == (str(w), str(h), mode)
        assert meta["valid_box"] == f"0,0,{w},{h}"
        assert meta["exif_transposed"] == ("true" if name == "rotated" else "false")
        assert (meta["format"], meta["scaled"], meta["store"]) == (FORMAT, "true", "mean")
        assert (float(meta["scaling_factor"]), float(meta["shift_factor"])) == (SCALE, SHIFT)
        assert meta["weights_sha256"] == hashlib.sha256(models["tiny"].read_bytes()).hexdigest()
        assert meta["source"] == str(source)
        assert meta["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert meta["model"] == "vae" and meta["latentctl_version"]
    # decode finds the model from the metadata (no --weights) and crops back to the original size
    code, out, err = run_main(capsys, "decode", lat, "-o", dec, "--json")
    assert code == 0, err
    decoded_rows = json_lines(out)
    assert {r["status"] for r in decoded_rows} == {"ok"}
    for r in decoded_rows:
        w, h = Image.open(r["output"]).size
        assert r["shape"] == [3, h, w], r                          # an image's shape: cropped to the original
    # `latentctl info` on a good latent: what safetensors itself reads from the file
    code, out, err = run_main(capsys, "info", lat / "odd.safetensors", "--json")
    assert code == 0, err
    (shown,) = json_lines(out)
    meta, tensors = _meta(lat / "odd.safetensors")
    assert shown["kind"] == "latent" and shown["file"] == str(lat / "odd.safetensors")
    assert shown["tensors"] == {k: list(v.shape) for k, v in tensors.items()} and shown["metadata"] == meta
    code, out, err = run_main(capsys, "roundtrip", photos, "-o", rt, "-w", models["tiny"], "--json")
    assert code == 0, err
    rows = json_lines(out)
    assert all(0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and r["seconds"] > 0 for r in rows)
    for name, ((w, h), _) in EXPECTED.items():
        decoded, reconstructed = _pixels(dec / f"{name}.png"), _pixels(rt / f"{name}.png")
        assert decoded.shape == (h, w, 3)
        assert np.array_equal(decoded, reconstructed), name  # exactly what roundtrip gives
        assert Image.open(rt / f"{name}.compare.png").size == (3 * w, h)  # original | reconstruction | error
    # the table without --json: one row per image and the mean
    monkeypatch.chdir(photos)
    code, out, _ = run_main(capsys, "roundtrip", "gray.png", "sub", "-w", models["tiny"])
    assert code == 0 and "mean" in out and "gray.png" in out and "sub/la.png" in out


def _reference_rgb(path: Path, mode: str) -> np.ndarray:
    """The image as float RGB in [0, 1], read here with PIL + numpy (white background for alpha)."""
    im = Image.open(path)
    if mode == "I;16":
        return np.repeat(np.asarray(im, np.float64)[..., None] / 65535, 3, axis=2)
    if mode == "RGBA":
        a = np.asarray(im, np.float64) / 255
        return a[..., :3] * a[..., 3:] + (1 - a[..., 3:])
    return np.asarray(im.convert("RGB"), np.float64) / 255


def test_stored_latent_is_the_model_ready_posterior_mean(photos, models, tmp_path, capsys):
    """The stored latent against (vae.encode(x).mean - shift) * scale computed here: the same weights built
    afresh, the image read and reflect-padded with numpy."""
    names = {"odd": "RGB", "gray": "L", "rgba": "RGBA", "deep": "I;16"}
    code, _, err = run_main(capsys, "encode", *(next(photos.glob(n + ".*")) for n in names), "-o", tmp_path,
                            "-w", models["tiny"], "-q", "--dtype", "fp32")   # as the reference (auto: bf16 on AMX)
    assert code == 0, err
    vae = make_tiny_vae(0)   # what models["tiny"] holds
    for name, mode in names.items():
        rgb = _reference_rgb(next(photos.glob(name + ".*")), mode)
        h, w = rgb.shape[:2]
        padded = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="reflect")   # to the model's factor, 2
        x = torch.from_numpy(padded * 2 - 1).float().permute(2, 0, 1)[None]
        with torch.no_grad():
            want = (vae.encode(x).mean[0] - SHIFT) * SCALE
        got = _meta(tmp_path / f"{name}.safetensors")[1]["latent"].float()
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 2e-3 * max(1.0, want.abs().max().item()), name   # fp16 storage


def test_factor_8_model_at_333x517(photos, models, tmp_path, capsys):
    # factor 8 keeps the mid-block attention cheap at this size (factor 2 would attend over 43k positions)
    lat, dec, rt = tmp_path / "lat", tmp_path / "dec", tmp_path / "rt"
    big = _save(_photo("chelsea", (333, 517)), tmp_path / "in" / "big.png")
    for name in ("gray.png", "rotated.jpg"):  # one folder: outputs mirror paths from the folder holding all inputs
        (tmp_path / "in" / name).write_bytes((photos / name).read_bytes())
    inputs = [big, tmp_path / "in" / "gray.png", tmp_path / "in" / "rotated.jpg"]
    assert run_main(capsys, "encode", *inputs, "-o", lat, "-w", models["f8"], "-q")[0] == 0
    assert _meta(lat / "big.safetensors")[1]["latent"].shape == (4, 65, 42)      # padded to 336x520
    assert _meta(lat / "big.safetensors")[0]["valid_box"] == "0,0,333,517"
    assert _meta(lat / "gray.safetensors")[1]["latent"].shape == (4, 4, 5)       # 40x30 -> padded 40x32
    assert _meta(lat / "rotated.safetensors")[1]["latent"].shape == (4, 5, 3)    # 24x40 (rotated)
    assert run_main(capsys, "decode", lat, "-o", dec, "-q")[0] == 0
    assert run_main(capsys, "roundtrip", *inputs, "-o", rt, "-w", models["f8"], "-q")[0] == 0
    for name, size in (("big", (333, 517)), ("gray", (40, 30)), ("rotated", (24, 40))):
        assert Image.open(dec / f"{name}.png").size == size
        assert np.array_equal(_pixels(dec / f"{name}.png"), _pixels(rt / f"{name}.png")), name


def test_resize_and_center_crop_are_recorded(photos, models, tmp_path, capsys):
    code, _, err = run_main(capsys, "encode", photos / "odd.png", "-o", tmp_path, "-w", models["f8"], "--resize", "40",
                       "--center-crop", "32x40", "-q")
    assert code == 0, err
    meta, tensors = _meta(tmp_path / "odd.safetensors")
    assert (meta["width"], meta["height"], meta["resized"], meta["crop_box"]) == ("61", "47", "52x40", "10,0,42,40")
    assert tensors["latent"].shape == (4, 5, 4) and meta["valid_box"] == "0,0,32,40"


def test_tiled_encode_decode_is_plugged_in(photos, models, tmp_path, capsys, monkeypatch):
    """--tile / --tile-size reach the tiler (a spy on tiling.plan and on the tiled runner), and the tiled result
    is the untiled one."""
    from latentctl import tiling

    plans, executed = [], []
    real_plan, real_execute = tiling.plan, tiling._execute

    def plan(vae, shape, what, **kw):
        p = real_plan(vae, shape, what, **kw)
        plans.append((what, kw.get("mode"), kw.get("tile_size"), p))
        return p

    def execute(vae, x, what, tile_plan, *args):
        executed.append((what, tile_plan))
        return real_execute(vae, x, what, tile_plan, *args)

    monkeypatch.setattr(tiling, "plan", plan)
    monkeypatch.setattr(tiling, "_execute", execute)
    # fp32: the bounds below are float32 rounding (auto is bf16 on a CPU with bf16 kernels)
    for name, extra in (("whole", ["--tile", "off", "--dtype", "fp32"]),
                        ("tiled", ["--tile", "on", "--tile-size", "32", "--dtype", "fp32"])):
        plans.clear(), executed.clear()
        code, _, err = run_main(capsys, "encode", photos / "odd.png", "-o", tmp_path / name, "-w", models["tiny"],
                                *extra)
        assert code == 0, err
        assert run_main(capsys, "decode", tmp_path / name, "-o", tmp_path / f"img-{name}", *extra, "-q")[0] == 0
        assert [(what, mode) for what, mode, _, _ in plans] == [("encode", extra[1]), ("decode", extra[1])]
        if name == "whole":
            assert not executed and not any(p.tile for *_, p in plans)
        else:
            assert [what for what, _ in executed] == ["encode", "decode"]
            for what, _, tile_size, p in plans:
                assert tile_size == 32 and p.tile
                # more than one tile: a 61x47 image (64x48 padded) cut into 32-px tiles
                assert any(seg.kind == "tiles" and seg.steps > 1 for seg in p.segments), p.describe()
    whole, tiled = (_meta(tmp_path / d / "odd.safetensors")[1]["latent"].float() for d in ("whole", "tiled"))
    assert (whole - tiled).abs().max() <= 4e-3  # the same up to float rounding (and fp16 storage)
    diff = np.abs(_pixels(tmp_path / "img-whole/odd.png").astype(int) - _pixels(tmp_path / "img-tiled/odd.png"))
    assert diff.max() <= 2


def test_spill_dir_must_be_a_folder(photos, models, tmp_path, capsys):
    code, _, err = run_main(capsys, "encode", photos / "odd.png", "-o", tmp_path / "out", "-w", models["tiny"],
                       "--spill-dir", tmp_path / "missing")
    assert code == 2 and "--spill-dir" in err and "not a folder" in err
    assert not (tmp_path / "out").exists()


# --- stores and seeds -------------------------------------------------------------------------------------------

def test_stores_posterior_and_sample_are_reproducible_and_all_decode(photos, tmp_path, capsys):
    """A sample is mean + std * N(0, 1) noise: the noise recovered from the stored sample and posterior has mean
    ~0 and std ~1. The model's log-variance is moved to about -4 (std 0.14, variance 0.02), so that a draw scaled
    by the variance, or not scaled, cannot pass for one scaled by the std."""
    vae = make_tiny_vae(0)
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 4.0       # the logvar half of the posterior's moments
    weights = save_weights(vae, tmp_path / "lowvar" / "vae.safetensors", SCALE, SHIFT)
    inputs = [photos / "odd.png"]            # 61x47: a 4x24x31 latent, 2,976 draws
    runs = {"mean": [], "posterior": [], "sample": ["--seed", "7"], "again": ["--store", "sample", "--seed", "7"],
            "other": ["--store", "sample", "--seed", "8"]}
    for name, extra in runs.items():
        store = ["--store", name] if name in ("mean", "posterior", "sample") else []
        code, _, err = run_main(capsys, "encode", *inputs, "-o", tmp_path / name, "-w", weights, *store, *extra,
                                "--latent-dtype", "fp32", "-q")
        assert code == 0, err
    (m_meta, mean), (p_meta, post), (s_meta, sample) = (_meta(tmp_path / s / "odd.safetensors")
                                                        for s in ("mean", "posterior", "sample"))
    _, again = _meta(tmp_path / "again" / "odd.safetensors")
    _, other = _meta(tmp_path / "other" / "odd.safetensors")
    assert set(post) == {"latent", "mean", "logvar"} and p_meta["store"] == "posterior"
    assert torch.equal(post["latent"], mean["latent"])
    # latent = (mean - shift) * scale; mean and logvar stay raw
    assert torch.allclose(post["latent"], (post["mean"] - SHIFT) * SCALE, atol=1e-6)
    assert -4.5 < post["logvar"].mean() < -3.5
    assert torch.equal(sample["latent"], again["latent"])           # same seed: same bits
    assert not torch.equal(sample["latent"], other["latent"])       # another seed: another draw
    assert (s_meta["store"], s_meta["seed"]) == ("sample", "7")
    for draw in (sample, other):
        z = draw["latent"] / SCALE + SHIFT                           # back to the raw latent
        noise = (z - post["mean"]) / torch.exp(0.5 * post["logvar"])
        assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1, (noise.mean(), noise.std())
    for store in ("mean", "posterior", "sample"):
        code, _, err = run_main(capsys, "decode", tmp_path / store, "-o", tmp_path / f"img-{store}", "-q")
        assert code == 0, err
        assert Image.open(tmp_path / f"img-{store}" / "odd.png").size == (61, 47)
    assert np.array_equal(_pixels(tmp_path / "img-mean/odd.png"), _pixels(tmp_path / "img-posterior/odd.png"))


def test_nan_in_reduced_precision_redoes_the_batch_in_fp32(photos, models, tmp_path, monkeypatch):
    vae, info = load(None, weights=models["tiny"])
    real = run.encode_batch

    def overflowing(vae, x, options):  # what the SDXL VAE does in fp16
        posterior = real(vae, x, options)
        if options.dtype != torch.float32:
            posterior.mean[0, 0, 0, 0] = float("inf")
        return posterior

    monkeypatch.setattr(run, "encode_batch", overflowing)
    warnings = []
    items = plan_encode([str(photos / "sub")], tmp_path / "bf16")
    summary = encode_files(vae, info, items, Options(dtype=torch.bfloat16), warn=warnings.append)
    assert summary.ok == 2 and len(warnings) == 2  # one per batch (the two images differ in size)
    assert all("NaN/inf in bfloat16" in w and "redoing it in fp32" in w for w in warnings)
    encode_files(vae, info, plan_encode([str(photos / "sub")], tmp_path / "fp32"), Options())
    for name in ("la", "palette"):
        got, want = (_meta(tmp_path / d / f"{name}.safetensors")[1]["latent"] for d in ("bf16", "fp32"))
        assert torch.isfinite(got).all() and torch.equal(got, want)


# --- bad inputs, resume, refusals, exit codes -------------------------------------------------------------------

def _bad_files(folder: Path) -> dict[str, str]:
    """A dozen kinds of bad file -> a word their error line must contain."""
    photo = _photo("astronaut", (48, 48))
    blobs = {}
    for fmt in ("PNG", "JPEG", "GIF", "TIFF"):
        buf = io.BytesIO()
        photo.save(buf, fmt)
        blobs[fmt] = buf.getvalue()
    png = bytearray(blobs["PNG"])
    png[len(png) // 2] ^= 0xFF
    float_tif = io.BytesIO()
    Image.fromarray(np.full((8, 8), 1000.0, np.float32)).save(float_tif, "TIFF")
    huge = io.BytesIO()
    Image.new("RGB", (400, 300)).save(huge, "PNG")
    files = {
        "empty.png": (b"", "empty"),
        "truncated-jpeg.jpg": (blobs["JPEG"][: len(blobs["JPEG"]) // 3], "truncated"),
        "truncated-png.png": (blobs["PNG"][: len(blobs["PNG"]) // 2], "truncated"),
        "truncated-gif.gif": (blobs["GIF"][: len(blobs["GIF"]) // 2], "truncated"),
        "truncated-tiff.tif": (blobs["TIFF"][: len(blobs["TIFF"]) // 2], "truncated"),
        "crc.png": (bytes(png), "corrupt"),
        "notes.jpg": (b"just some text\n" * 20, "not an image"),
        "page.webp": (b"<html><body>404 Not Found</body></html>", "not an image"),
        "noise.bmp": (np.random.default_rng(0).bytes(2000), "not an image"),
        "header-only.png": (blobs["PNG"][:8] + b"\0" * 40, "not an image"),
        "float.tif": (float_tif.getvalue(), "outside 0..1"),
        "huge.png": (huge.getvalue(), "over the limit"),
    }
    expected = {}
    for name, (blob, reason) in files.items():
        (folder / name).write_bytes(blob)
        expected[name] = reason
    (folder / "gone.png").symlink_to(folder / "never-existed.png")
    expected["gone.png"] = "No such file"
    if os.geteuid() != 0:  # root reads everything
        (folder / "locked.png").write_bytes(blobs["PNG"])
        (folder / "locked.png").chmod(0)
        expected["locked.png"] = "Permission denied"
    return expected


def test_folder_of_good_and_bad_files(models, tmp_path, capsys):
    folder = tmp_path / "mixed"
    good = {"a.png": _photo("astronaut", (48, 40)), "b.jpg": _photo("coffee", (40, 32)),
            "deep/c.webp": _photo("chelsea", (36, 36)), "deep/d.png": _photo("camera", (32, 24))}
    for name, im in good.items():
        _save(im, folder / name)
    bad = _bad_files(folder)
    (folder / "a.txt").write_text("a caption, not an image: ignored")
    out = tmp_path / "lat"
    code, stdout, stderr = run_main(capsys, "encode", folder, "-o", out, "-w", models["tiny"], "--max-pixels", "100000",
                               "--json")
    assert code == 1, stderr
    records = {Path(r["input"]).relative_to(folder).as_posix(): r for r in json_lines(stdout)}
    assert set(records) == set(good) | set(bad)
    for name in good:
        assert records[name]["status"] == "ok"
        assert (out / name).with_suffix(".safetensors").is_file()
    for name, reason in bad.items():
        assert records[name]["status"] == "error" and reason.lower() in records[name]["error"].lower(), records[name]
        assert not (out / name).with_suffix(".safetensors").exists()
        line = next(ln for ln in stderr.splitlines() if str(folder / name) in ln)
        assert line.startswith(f"error: {folder / name}: ")
    assert f"{len(good)} ok, 0 skipped, {len(bad)} failed" in stderr
    # a rerun skips the finished ones and reports the bad ones again; --fail-fast stops at the first
    code, stdout, _ = run_main(capsys, "encode", folder, "-o", out, "-w", models["tiny"], "--max-pixels", "100000", "--json")
    assert code == 1 and sum(r["status"] == "skipped" for r in json_lines(stdout)) == len(good)
    code, stdout, _ = run_main(capsys, "encode", folder, "-o", tmp_path / "ff", "-w", models["tiny"], "--fail-fast",
                          "--json", "--batch-size", "1", "--workers", "1")
    assert code == 1 and sum(r["status"] == "error" for r in json_lines(stdout)) == 1


def test_exit_codes_0_and_1_resume_and_refusals(photos, models, tmp_path, capsys, monkeypatch):
    lat = tmp_path / "lat"
    one = photos / "gray.png"
    assert run_main(capsys, "encode", one, "-o", lat, "-w", models["tiny"])[0] == 0
    code, _, err = run_main(capsys, "encode", one, "-o", lat, "-w", models["tiny"])
    assert code == 0 and "0 ok, 1 skipped" in err
    # an existing file written with other settings is refused, not mixed in; --overwrite redoes it
    code, _, err = run_main(capsys, "encode", one, "-o", lat, "-w", models["tiny"], "--store", "posterior")
    assert code == 1 and "other settings" in err and "store='mean'" in err
    assert run_main(capsys, "encode", one, "-o", lat, "-w", models["tiny"], "--store", "posterior", "--overwrite")[0] == 0
    # a missing input is that input's error (1), not a usage error
    code, _, err = run_main(capsys, "encode", tmp_path / "no-such-dir", "-o", tmp_path / "u", "-w", models["tiny"])
    assert code == 1 and "no such file" in err
    # a name clash costs only the clashing inputs (test_reliability has the rest of the run going on)
    code, _, err = run_main(capsys, "encode", _twins(tmp_path), "-o", tmp_path / "t", "-w", models["tiny"])
    assert code == 1 and err.count("would also be written") == 2 and not list((tmp_path / "t").rglob("*.safetensors"))
    # decode refuses latents that do not fit the model: channels, and weights other than the recorded ones
    toml = tmp_path / "c8.toml"   # --model decodes every file with that model, whatever they record
    toml.write_text(f'[c8]\npath = "{models["c8"]}"\nz_channels = 8\nch_mult = [1, 2]\n')
    code, _, err = run_main(capsys, "decode", lat, "-o", tmp_path / "d8", "-m", "c8", "--models", toml)
    assert code == 1 and "4 channels" in err and "takes 8" in err
    other = _weights(tmp_path / "other", seed=1)
    vae, info = load(None, weights=other)
    records = []
    summary = decode_files(vae, info, plan_decode([str(lat)], tmp_path / "d2"), Options(), report=records.append)
    assert summary.failed == 1 and "not by" in records[0].error
    # '-' reads paths from stdin
    code, out, err = run_main(capsys, "encode", "-", "-o", tmp_path / "stdin", "-w", models["tiny"], "--json",
                         stdin=f"{one}\n{photos / 'sub' / 'la.png'}\n", monkeypatch=monkeypatch)
    assert code == 0 and [r["status"] for r in json_lines(out)] == ["ok", "ok"]


def _twins(tmp: Path) -> Path:
    """x.png and x.jpg in one folder: both would be written as x.safetensors."""
    for ext in ("png", "jpg"):
        _save(_photo("camera", (16, 16)), tmp / "twins" / f"x.{ext}")
    return tmp / "twins"


# Usage, model and weights errors: (arguments from (photos, models, tmp_path), what the one line says).
USAGE_ERRORS = {
    "unknown model": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-m", "no-such-model"],
                      "unknown model"),
    "missing weights": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-w", t / "missing.safetensors"],
                        "no such file"),
    "latent dtype": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-w", m["tiny"],
                                      "--latent-dtype", "fp8"], "--latent-dtype"),
    "seed without sample": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-w", m["tiny"],
                                             "--seed", "3"], "--seed"),
    "tile mode": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-w", m["tiny"], "--tile", "sideways"],
                  "--tile"),
    "center crop": (lambda p, m, t: ["encode", p / "gray.png", "-o", t / "u", "-w", m["tiny"],
                                     "--center-crop", "big"], "--center-crop"),
    "decode format": (lambda p, m, t: ["decode", p, "-o", t / "u", "--format", "bmp"], "--format"),  # gif: clips
    "decode output is a file": (lambda p, m, t: ["decode", p, "-o", p / "gray.png"], "not a folder"),
    "no output folder": (lambda p, m, t: ["encode", p / "gray.png"], "Missing option"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2_with_one_line(case, photos, models, tmp_path, capsys):
    """Each: exit 2, the reason in one line on stderr, no traceback, nothing written."""
    make_args, message = USAGE_ERRORS[case]
    code, out, err = run_main(capsys, *make_args(photos, models, tmp_path))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "u").exists()


def test_decode_latents_from_other_tools(models, tmp_path, capsys):
    vae, _ = load(None, weights=models["tiny"])
    z = torch.randn(1, 4, 10, 12)
    save_file({"latents": (z * 0.3).contiguous()}, tmp_path / "foreign.safetensors")  # batch of one, no metadata
    code, _, err = run_main(capsys, "decode", tmp_path / "foreign.safetensors", "-o", tmp_path / "a", "-w", models["tiny"])
    assert code == 1 and "no tensor 'latent'" in err
    code, _, err = run_main(capsys, "decode", tmp_path / "foreign.safetensors", "-o", tmp_path / "a", "-w", models["tiny"],
                       "--key", "latents")
    assert code == 1 and "--scaling-factor" in err
    code, _, err = run_main(capsys, "decode", tmp_path / "foreign.safetensors", "-o", tmp_path / "a", "-w", models["tiny"],
                       "--key", "latents", "--scaling-factor", "0.3", "--dtype", "fp32")  # as the fp32 reference
    assert code == 0, err
    with torch.no_grad():
        want = ((vae.decode(z * 0.3 / 0.3)[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.array_equal(_pixels(tmp_path / "a" / "foreign.png"), want.astype(np.uint8))


# --- real processes: a terminal on stderr, SIGINT, SIGKILL ---------------------------------------------------

def _command(*args) -> list[str]:
    return [sys.executable, "-m", "latentctl", *map(str, args)]


@pytest.mark.slow
def test_json_on_stdout_while_stderr_is_a_terminal(photos, models, tmp_path):
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    proc = subprocess.Popen(_command("encode", "-", "-o", tmp_path / "out", "-w", models["tiny"], "--json"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    terminal = []

    def read_terminal():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the process has closed its end
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    paths = "".join(f"{p}\n" for p in (photos / "gray.png", photos / "rgba.png", photos / "sub" / "la.png",
                                       photos / "no-such.png"))
    stdout, _ = proc.communicate(paths.encode(), timeout=240)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 1
    records = [json.loads(line) for line in stdout.decode().splitlines()]  # stdout: JSON lines and nothing else
    assert sorted(r["status"] for r in records) == ["error", "ok", "ok", "ok"]
    text = b"".join(terminal).decode(errors="replace")
    assert "no-such.png" in text and "4/4" in text and "3 ok" in text  # error line, bar and summary: terminal
    assert '"status"' not in text


def _wait_for(folder: Path, count: int, proc, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while len(list(folder.rglob("*.safetensors"))) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < end, "no output appeared"
        time.sleep(0.005)


@pytest.mark.slow
def test_sigint_then_sigkill_then_rerun_does_exactly_the_rest(models, tmp_path, capsys):
    src, out = tmp_path / "imgs", tmp_path / "out"
    base = np.asarray(_photo("astronaut", (64, 64)))
    total = 16
    for i in range(total):  # different crops of a real photo, in a few folders
        _save(Image.fromarray(base[i: i + 48, i: i + 48]), src / f"{i // 6}" / f"{i:02d}.png")
    flags = ["encode", src, "-o", out, "-w", models["tiny"], "--batch-size", "1", "--workers", "1", "-q"]
    args = _command(*flags)

    # Ctrl-C: the writes in flight finish, exit 130
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    after_int = len(list(out.rglob("*.safetensors")))
    assert 0 < after_int < total

    # SIGKILL at an arbitrary moment: nothing to finish anything
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out, after_int + 2, proc)
    proc.kill()
    proc.wait(timeout=60)
    present = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.safetensors")}
    assert len(present) < total
    for path in present:  # every file there is complete
        assert _meta(path)[1]["latent"].shape == (4, 24, 24)

    # the same command again (in this process) skips exactly those and does the rest; nothing corrupt or left behind
    code, stdout, err = run_main(capsys, *flags, "--json")
    assert code == 0, err
    records = json_lines(stdout)
    assert {Path(r["output"]) for r in records if r["status"] == "skipped"} == set(present)
    assert sum(r["status"] == "ok" for r in records) == total - len(present)
    final = list(out.rglob("*.safetensors"))
    assert len(final) == total
    assert all(_meta(p)[1]["latent"].shape == (4, 24, 24) for p in final)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamp for p, stamp in present.items())  # not rewritten
    assert not [p for p in out.rglob("*") if p.name.endswith("latentctl-tmp")]
