"""The pipeline's parts on their own: image modes and geometry, input discovery, the latent file, the metrics."""

import io
import os
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
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


def test_palette_is_looked_up_in_its_own_colours():
    """P mode against numpy indexing of the palette written into the file (not pillow's convert)."""
    palette = np.array([[0, 0, 0], [255, 0, 0], [12, 200, 37], [250, 250, 5], [17, 34, 51]], np.uint8)
    index = np.random.default_rng(3).integers(0, len(palette), (6, 9)).astype(np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.flatten().tolist())
    for fmt in ("PNG", "GIF"):
        loaded = _read(p, fmt)
        assert loaded.mode == "P" and not loaded.has_alpha
        assert np.array_equal(np.round(loaded.rgb * 255).astype(np.uint8), palette[index]), fmt
    p.info["transparency"] = 0
    assert images.to_rgb(p)[1] is True  # palette transparency counts as alpha
    for mode in ("1", "YCbCr", "LAB", "HSV"):
        assert images.to_rgb(PHOTO.convert(mode))[0].shape == (40, 48, 3)
    with pytest.raises(UsageError):
        images.parse_color("purple-ish")


# CMYK ink -> the RGB it prints as: each ink takes away its complementary primary; K takes away everything.
INKS = {"none": ((0, 0, 0, 0), (255, 255, 255)), "cyan": ((255, 0, 0, 0), (0, 255, 255)),
        "magenta": ((0, 255, 0, 0), (255, 0, 255)), "yellow": ((0, 0, 255, 0), (255, 255, 0)),
        "black": ((0, 0, 0, 255), (0, 0, 0)), "cyan+yellow": ((255, 0, 255, 0), (0, 255, 0)),
        "half cyan": ((128, 0, 0, 0), (127, 255, 255)), "half black": ((0, 0, 0, 128), (127, 127, 127))}


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_patches_print_as_their_inks(fmt):
    """Pure C, M, Y, K patches (and a mix, half tints) in a CMYK file -> the RGB the inks print as. JPEG (where
    Adobe files store inverted CMYK) within JPEG's error, at the centre of 16-pixel flat patches."""
    cmyk = np.zeros((16, 16 * len(INKS), 4), np.uint8)
    for i, (ink, _) in enumerate(INKS.values()):
        cmyk[:, 16 * i:16 * (i + 1)] = ink
    kw = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    loaded = _read(Image.fromarray(cmyk, "CMYK"), fmt, **kw)
    assert loaded.mode == "CMYK"
    got = np.round(loaded.rgb * 255)
    tolerance = 3 if fmt == "JPEG" else 0
    for i, (name, (_, rgb)) in enumerate(INKS.items()):
        centre = got[4:12, 16 * i + 4:16 * i + 12]
        assert np.abs(centre - np.array(rgb)).max() <= tolerance, (name, centre[0, 0], rgb)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(a: np.ndarray, color_type: int, size=None) -> bytes:
    """PNG bytes by hand (big-endian samples, filter 0 on every row); `size` makes the header claim another size."""
    h, w = a.shape[:2]
    w, h = size or (w, h)
    raw = b"".join(b"\0" + row.tobytes() for row in a)
    header = struct.pack(">IIBBBBB", w, h, a.dtype.itemsize * 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def test_16bit_rgb_is_scaled_from_65535():
    """A 16-bit RGB PNG (written here byte by byte) -> each channel value/65535, channels in order. pillow reads
    16-bit RGB at 8 bits, so the promise held is 8-bit precision (1/255), not 16-bit (16-bit gray keeps it)."""
    a = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1087 + 17).astype(">u2")     # 17 .. 64 870, every channel apart
    loaded = images.read_image(_png(a, color_type=2), max_pixels=100)
    assert loaded.rgb.shape == (4, 5, 3) and not loaded.has_alpha
    assert np.abs(loaded.rgb - a / 65535).max() <= 1 / 255 + 1e-6


def test_decompression_bomb_is_refused_from_the_header(monkeypatch):
    """A 100-byte PNG whose header claims 60000x60000 (3.6 G pixels): refused before any decoding (decoding is
    patched to fail, and is reached with a higher limit)."""
    class Decoded(Exception):
        pass

    def no_decoding(self, *args, **kwargs):
        raise Decoded

    bomb = _png(np.zeros((1, 3, 3), np.uint8), color_type=2, size=(60000, 60000))
    assert len(bomb) < 100
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(InputError, match="60000x60000 = 3,600,000,000 pixels is over the limit of 100,000"):
        images.read_image(bomb, max_pixels=100_000)
    with pytest.raises(Decoded):  # the patch is in the way of decoding: a check after decoding would not pass
        images.read_image(bomb, max_pixels=10**10)


# EXIF orientation -> what turns the stored pixels into the displayed picture, in numpy (the EXIF 2.3 table).
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,                                        # mirrored left-right
    3: lambda a: np.rot90(a, 2),                         # upside down
    4: np.flipud,                                        # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),                   # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),                        # stored turned left: turn 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),      # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),                         # stored turned right: turn 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation):
    """Each EXIF orientation on a lossless PNG against numpy's rotations and flips of the stored pixels."""
    im = PHOTO.copy()   # 48 wide, 40 high: a transpose shows in the shape
    exif = im.getexif()
    exif[0x0112] = orientation
    loaded = _read(im, "PNG", exif=exif)
    want = ORIENTATIONS[orientation](np.asarray(PHOTO))
    assert loaded.exif_transposed == (orientation != 1)
    assert np.array_equal(np.round(loaded.rgb * 255).astype(np.uint8), want)
    assert not _read(PHOTO, "PNG").exif_transposed


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


def test_worker_threads_free_their_jobs_before_close_returns():
    """The inputs of a worker's last job must be freed while the run is alive: freed by a daemon thread during the
    interpreter's exit, a tensor aborts the process (torch gives up the GIL in its destructor). An input that is
    slow to free shows whether close() waited for it."""
    import threading
    import time

    from latentctl.pipeline.run import _Threads

    freed = []

    class SlowToFree:
        def __del__(self):
            time.sleep(0.3)
            freed.append(threading.current_thread().name)

    pool = _Threads(2, "latentctl-test")
    futures = [pool.submit(lambda x: 1, SlowToFree()) for _ in range(3)]
    assert [f.result() for f in futures] == [1, 1, 1]
    del futures
    pool.close(wait=10.0)
    assert len(freed) == 3 and all(name.startswith("latentctl-test") for name in freed), freed
    assert not any(t.name.startswith("latentctl-test") for t in threading.enumerate())
