"""The pipeline's parts on their own: image modes and geometry, input discovery, the latent file, the metrics."""

import io
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from latentctl.errors import InputError, UsageError
from latentctl.metrics import psnr, ssim
from latentctl.pipeline import images, inputs, latents


def _bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _read(im, fmt="PNG", **kw):
    return images.read_image(_bytes(im, fmt, **kw), max_pixels=10**8)


PHOTO = Image.fromarray(data.astronaut()).resize((48, 40))


# --- images: every mode -----------------------------------------------------------------------------------------

def test_rgb_and_gray_are_exact():
    rgb = _read(PHOTO).rgb
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.float32
    assert np.array_equal(np.round(rgb * 255).astype(np.uint8), np.asarray(PHOTO))
    gray = Image.fromarray(data.camera()).resize((30, 20))
    loaded = _read(gray)
    assert loaded.mode == "L" and np.array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])
    assert np.array_equal(np.round(loaded.rgb[..., 1] * 255).astype(np.uint8), np.asarray(gray))


def test_16bit_is_scaled_not_clipped():
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    loaded = _read(Image.fromarray(a))
    assert loaded.mode == "I;16"
    np.testing.assert_allclose(loaded.rgb[0, :, 0], a[0] / 65535, rtol=0, atol=1e-7)
    # 32-bit integer mode holding 16-bit values is scaled the same way; out-of-range values are refused
    loaded = images.to_rgb(Image.fromarray(a.astype(np.int32)))[0]
    np.testing.assert_allclose(loaded[0, :, 1], a[0] / 65535, atol=1e-7)
    with pytest.raises(InputError, match="0..65535"):
        images.to_rgb(Image.fromarray(np.array([[70000]], dtype=np.int32)))


def test_alpha_is_composited_on_the_chosen_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (255, 0, 0, 0)        # transparent red: must vanish, not show as red "garbage"
    rgba[1, 0] = (0, 0, 255, 128)      # half blue
    on_black = images.read_image(_bytes(Image.fromarray(rgba, "RGBA")), max_pixels=100,
                                 alpha_background=images.parse_color("black"))
    assert on_black.has_alpha and on_black.mode == "RGBA"
    np.testing.assert_allclose(on_black.rgb[0, 0], [1, 0, 0])
    np.testing.assert_allclose(on_black.rgb[0, 1], [0, 0, 0])
    np.testing.assert_allclose(on_black.rgb[1, 0], [0, 0, 128 / 255], atol=1e-6)
    on_white = images.to_rgb(Image.fromarray(rgba, "RGBA"), images.parse_color("#ffffff"))[0]
    np.testing.assert_allclose(on_white[0, 1], [1, 1, 1])
    la = images.to_rgb(Image.fromarray(rgba, "RGBA").convert("LA"), (0.0, 0.0, 0.0))[0]
    assert la[0, 1].max() == 0


def test_palette_cmyk_and_other_modes():
    p = PHOTO.convert("P")
    assert np.array_equal(_read(p, "GIF").rgb, np.asarray(p.convert("RGB"), np.float32) / 255)
    p.info["transparency"] = 0
    assert images.to_rgb(p)[1] is True  # palette transparency counts as alpha
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink = white
    assert np.allclose(_read(cmyk, "JPEG", quality=100).rgb, 1.0, atol=2 / 255)
    for mode in ("1", "YCbCr", "LAB", "HSV"):
        assert images.to_rgb(PHOTO.convert(mode))[0].shape == (40, 48, 3)
    with pytest.raises(UsageError):
        images.parse_color("purple-ish")


def test_exif_orientation_is_applied():
    im = PHOTO.copy()
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = _read(im, "JPEG", exif=exif, quality=95)
    assert loaded.exif_transposed and loaded.rgb.shape == (48, 40, 3)  # displayed: 40 wide, 48 high
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(_bytes(im, "JPEG", exif=exif, quality=95))))
    assert np.array_equal(np.round(loaded.rgb * 255).astype(np.uint8), np.asarray(reference))
    assert not _read(PHOTO, "JPEG").exif_transposed


def test_bad_bytes_are_input_errors():
    png = _bytes(PHOTO)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    cases = {b"": "empty", png[: len(png) // 2]: "truncated", b"not an image": "not an image",
             bytes(flipped): "corrupt", _bytes(Image.new("RGB", (400, 300))): "over the limit"}
    for blob, reason in cases.items():
        with pytest.raises(InputError, match=reason):
            images.read_image(blob, max_pixels=100_000)


# --- images: geometry -------------------------------------------------------------------------------------------

def test_pad_reflects_and_records_the_valid_box():
    rgb = np.random.default_rng(0).random((5, 7, 3), dtype=np.float32)
    x, g = images.prepare(rgb, factor=4)
    assert x.shape == (3, 8, 8) and g.valid == (0, 0, 7, 5) and g.padded == (8, 8)
    assert (g.width, g.height, g.resized, g.crop) == (7, 5, None, None)
    back = (x + 1) / 2
    assert torch.allclose(back[:, :5, :7], torch.from_numpy(rgb).permute(2, 0, 1), atol=1e-6)
    assert torch.allclose(back[:, 5, :7], back[:, 3, :7])  # reflect: row 5 mirrors row 3
    x, g = images.prepare(np.ones((1, 1, 3), np.float32), factor=8)  # too small to reflect: replicate
    assert x.shape == (3, 8, 8) and bool((x == 1).all()) and g.valid == (0, 0, 1, 1)


def test_resize_and_center_crop():
    rgb = np.random.default_rng(1).random((60, 90, 3), dtype=np.float32)
    x, g = images.prepare(rgb, factor=8, resize=30, center_crop=(32, 24))
    assert g.resized == (45, 30) and g.crop == (6, 3, 38, 27) and g.valid == (0, 0, 32, 24)
    assert x.shape == (3, 24, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(InputError, match="smaller than --center-crop"):
        images.prepare(rgb, factor=8, center_crop=(100, 10))
    assert images.parse_size("512x256", "--center-crop") == (512, 256)
    with pytest.raises(UsageError):
        images.parse_size("512", "--center-crop")


def test_encode_image_formats_and_validity(tmp_path):
    rgb = np.asarray(PHOTO)
    for fmt in images.FORMATS:
        blob = images.encode_image(rgb, fmt)
        path = tmp_path / f"x.{fmt}"
        path.write_bytes(blob)
        assert images.is_valid_image(path) and Image.open(path).size == (48, 40)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), rgb)  # png is lossless
    (tmp_path / "half.png").write_bytes(images.encode_image(rgb)[:200])
    assert not images.is_valid_image(tmp_path / "half.png")


# --- inputs -----------------------------------------------------------------------------------------------------

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_discover_folders_globs_files_and_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("imgs/b.png", "imgs/a/c.JPG", "imgs/a/d.webp", "imgs/caption.txt", "imgs/.hidden.png",
                 "imgs/.cache/e.png", "imgs/out/old.png", "other/f.tif"):
        _touch(tmp_path / name)
    found = inputs.discover(["imgs"], inputs.IMAGE_EXTS, exclude=Path("imgs/out"))
    assert [str(i.rel) for i in found] == ["b.png", "a/c.JPG", "a/d.webp"]  # hidden, captions, output: left out
    assert all(i.error is None for i in found)
    globbed = inputs.discover(["imgs/*/*.webp"], inputs.IMAGE_EXTS)
    assert [str(i.rel) for i in globbed] == ["a/d.webp"]  # relative to the part before the wildcard
    direct = inputs.discover(["other/f.tif", "imgs/caption.txt", "missing.png", "nothing*.png"], inputs.IMAGE_EXTS)
    # named files are taken as they are, relative to the folder that holds all inputs
    assert [str(i.rel) for i in direct[:2]] == ["other/f.tif", "imgs/caption.txt"]
    assert direct[2].error == "no such file" and "matches" in direct[3].error
    assert [str(i.rel) for i in inputs.discover(["other/f.tif"], inputs.IMAGE_EXTS)] == ["f.tif"]
    piped = inputs.discover(["-"], inputs.IMAGE_EXTS, stdin_lines=["imgs/b.png\n", "\n", f"{tmp_path}/other/f.tif\n"])
    assert [str(i.rel) for i in piped] == ["imgs/b.png", "other/f.tif"]  # as if named on the command line
    items = inputs.assign_outputs(found + inputs.discover(["other/f.tif"], inputs.IMAGE_EXTS), Path("out"),
                                  ".safetensors")
    assert [str(i.output) for i in items][-1] == "out/f.safetensors"
    assert Path("out/a/c.safetensors") in [i.output for i in items]


def test_duplicate_outputs_are_refused_and_repeats_dropped(tmp_path):
    a, b, c = _touch(tmp_path / "x/a.png"), _touch(tmp_path / "x/a.jpg"), _touch(tmp_path / "y/c.png")
    twice = inputs.discover([str(tmp_path / "y"), str(c)], inputs.IMAGE_EXTS)
    assert len(inputs.assign_outputs(twice, tmp_path / "o", ".png")) == 1  # c.png named twice: one job
    clash = inputs.assign_outputs(inputs.discover([str(a), str(b), str(c)], inputs.IMAGE_EXTS), tmp_path / "o",
                                  ".safetensors")
    assert ["would also be written" in (i.error or "") for i in clash] == [True, True, False]  # only the twins


def test_resume_sorts_done_redo_and_conflicts(tmp_path):
    items = [inputs.Item(n, tmp_path / n, PurePosixPath(n), output=tmp_path / f"{n}.out") for n in "abcd"]
    for n in "abc":
        (tmp_path / f"{n}.out").write_bytes(b"x")
    states = {"a": ("done", ""), "b": ("redo", "corrupt"), "c": ("conflict", "other settings")}
    todo, done, refused = inputs.resume(items, False, lambda item: states[item.source])
    assert [i.source for i in todo] == ["b", "d"] and [i.source for i in done] == ["a"]
    assert todo[0].redo == "corrupt" and todo[1].redo is None
    assert refused[0][0].source == "c"
    assert len(inputs.resume(items, True, None)[0]) == 4  # --overwrite: everything again


# --- latent file ------------------------------------------------------------------------------------------------

def test_latent_file_write_read_check(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    meta = {"format": latents.FORMAT, "store": "mean", "weights_sha256": "abc"}
    latents.write(path, {"latent": torch.randn(2, 4, 6, 5)[1], "mean": torch.zeros(4, 6, 5)}, meta)
    t, m = latents.read(path)
    assert t.shape == (4, 6, 5) and m["store"] == "mean"
    assert path.stat().st_size < 2 * 4 * 6 * 5 * 4 + 1000  # the slice alone was saved, not the whole batch
    assert latents.check(path, {"store": "mean"}) == ("done", "")
    state, why = latents.check(path, {"store": "sample"})
    assert state == "conflict" and "store='mean'" in why
    assert not list(tmp_path.rglob("*latentctl-tmp"))
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    assert latents.check(path, {})[0] == "redo"
    with pytest.raises(InputError, match="truncated or corrupt"):
        latents.read(path)
    with pytest.raises(TypeError):
        latents.to_bytes({"latent": torch.zeros(1)}, {"width": 3})


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        latents.atomic_write(target, b"new content")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


# --- metrics ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_and_psnr_match_skimage(noise):
    rng = np.random.default_rng(0)
    a = data.astronaut()[100:164, 200:290].astype(np.float64) / 255
    b = np.clip(a + rng.normal(0, noise, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(v).permute(2, 0, 1) for v in (a, b))
    want = structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert ssim(ta, tb) == pytest.approx(want, abs=1e-9)
    assert psnr(ta, tb) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    gray = data.camera()[:50, :70].astype(np.float64) / 255
    gray_b = np.clip(gray + rng.normal(0, noise, gray.shape), 0, 1)
    want = structural_similarity(gray, gray_b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert ssim(torch.from_numpy(gray)[None], torch.from_numpy(gray_b)[None]) == pytest.approx(want, abs=1e-9)
    assert ssim(ta, ta) == pytest.approx(1.0) and psnr(ta, ta) == float("inf")
