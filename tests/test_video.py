"""Clips (mp4 through pyav, animated GIF/WebP through pillow), end to end through the CLI, against second code
paths: the frames of a clip encoded as images, imageio reading back what decode wrote, PSNR by its formula.
The clips are a scikit-image photo panned and zoomed, made here with imageio; a tiny random-weight model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import json_lines, make_tiny_vae, run_main, save_weights
from safetensors import safe_open
from skimage import data

from latentctl.cli.app import main
from latentctl.pipeline.frames import Selection, select

PROGRESS = ".latentctl-progress"  # the run's progress records (latentctl status), not latent data

W, H, T, FPS = 27, 21, 12, 8        # odd size: padded to the model's factor, and mp4 in yuv444p


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """conftest's TINY model (factor 2), with a config.json giving its latent scale and shift."""
    path = save_weights(make_tiny_vae(), tmp_path_factory.mktemp("model") / "vae.safetensors")
    (path.parent / "config.json").write_text(json.dumps({"scaling_factor": 0.5, "shift_factor": 0.1}))
    return path


def _pan_zoom(n: int, w: int = W, h: int = H) -> np.ndarray:
    """n frames (n, h, w, 3) uint8: a window over the astronaut photo moving right and down while zooming in."""
    photo = data.astronaut()
    frames = []
    for k in range(n):
        side = 200 - 4 * k
        top, left = 80 + 3 * k, 140 + 5 * k
        crop = Image.fromarray(photo[top:top + side, left:left + side * w // h])
        frames.append(np.asarray(crop.resize((w, h), Image.BILINEAR)))
    return np.stack(frames)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    frames = _pan_zoom(T)
    iio.imwrite(d / "pan.mp4", frames, plugin="pyav", codec="libx264", fps=FPS, out_pixel_format="yuv444p")
    iio.imwrite(d / "hop.gif", frames, extension=".gif", duration=[100, 200] * (T // 2), loop=0)
    iio.imwrite(d / "spin.webp", frames, extension=".webp", duration=125, loop=0, lossless=True)
    return d


cli = run_main
_records = json_lines


def _load(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def mp4_latent(clips, weights, tmp_path_factory):
    """pan.mp4 encoded whole in fp32 with --store posterior, and its frames encoded one by one as PNG images."""
    out = tmp_path_factory.mktemp("lat")
    frames_dir = tmp_path_factory.mktemp("frames")
    for k, frame in enumerate(iio.imiter(clips / "pan.mp4", plugin="pyav")):
        Image.fromarray(frame).save(frames_dir / f"{k:02d}.png")
    args = ["-w", weights, "--latent-dtype", "fp32", "--store", "posterior", "--batch-size", "5", "--json"]
    for src, dst in ((clips / "pan.mp4", out / "clip"), (frames_dir, out / "frames")):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in ["encode", src, "-o", dst, *args]])
        assert e.value.code == 0
    return out / "clip" / "pan.safetensors", out / "frames", frames_dir


# --- encode ---------------------------------------------------------------------------------------------------

def test_clip_latent_is_the_per_frame_image_latents(mp4_latent, clips):
    path, frame_latents, frames_dir = mp4_latent
    meta, tensors = _load(path)
    assert tensors["latent"].shape == (T, 4, 11, 14)  # 21x27 padded to 22x28, factor 2
    assert tensors["mean"].shape == tensors["logvar"].shape == (T, 4, 11, 14)
    assert meta["kind"] == "clip" and meta["frames"] == str(T) and float(meta["fps"]) == FPS
    assert json.loads(meta["timestamps"]) == pytest.approx([k / FPS for k in range(T)], abs=1e-6)
    assert json.loads(meta["frame_indices"]) == list(range(T))
    assert (meta["width"], meta["height"], meta["valid_box"], meta["padded"]) == (str(W), str(H), f"0,0,{W},{H}",
                                                                                  "28x22")
    assert meta["reader"] == "pyav" and meta["codec"] == "h264"
    for k in range(T):
        _, image = _load(frame_latents / f"{k:02d}.safetensors")
        for key in ("latent", "mean", "logvar"):
            assert (tensors[key][k] - image[key]).abs().max() <= 1e-4, (k, key)


def test_animated_gif_and_webp_timestamps_and_fps(clips, weights, tmp_path, capsys):
    still = tmp_path / "in" / "still.gif"
    still.parent.mkdir()
    Image.fromarray(_pan_zoom(1)[0]).save(still)
    for name in ("hop.gif", "spin.webp"):  # one folder: outputs mirror paths from the folder holding all inputs
        (tmp_path / "in" / name).symlink_to(clips / name)
    code, out, err = cli(capsys, "encode", tmp_path / "in" / "hop.gif", tmp_path / "in" / "spin.webp", still,
                         "-o", tmp_path / "lat", "-w", weights, "--json")
    assert code == 0, err
    assert {r["input"]: r["shape"] for r in _records(out)}[str(still)] == [4, 11, 14]  # a still GIF is an image
    gif, _ = _load(tmp_path / "lat" / "hop.safetensors")
    gif_stamps = np.cumsum([0] + [100, 200] * (T // 2))[:T] / 1000
    assert json.loads(gif["timestamps"]) == pytest.approx(gif_stamps.tolist())
    assert float(gif["fps"]) == pytest.approx(T / 1.8) and gif["reader"] == "pillow"
    webp, tensors = _load(tmp_path / "lat" / "spin.safetensors")
    assert tensors["latent"].shape == (T, 4, 11, 14) and float(webp["fps"]) == 8


def test_webp_frames_equal_the_source_frames(clips, weights, tmp_path, capsys):
    """Lossless WebP: its latent of frame k is the image encode of frame k of the array it was made from, also
    through aspect buckets with --flip (the same cover resize and crop for every frame, mirrored latents)."""
    src = tmp_path / "w"
    src.mkdir()
    os.symlink(clips / "spin.webp", src / "anim.webp")
    frames = _pan_zoom(T)
    for k in (0, 7):
        Image.fromarray(frames[k]).save(src / f"f{k}.png")
    code, _, err = cli(capsys, "encode", src, "-o", tmp_path / "lat", "-w", weights, "--latent-dtype", "fp32",
                       "--buckets", "24x20,20x24", "--flip")
    assert code == 0, err
    meta, clip = _load(tmp_path / "lat" / "anim.safetensors")
    assert json.loads(meta["timestamps"]) == pytest.approx([k * 0.125 for k in range(T)])
    assert clip["latent"].shape == clip["latent_flipped"].shape == (T, 4, 10, 12) and meta["bucket"] == "24x20"
    for k in (0, 7):
        image_meta, image = _load(tmp_path / "lat" / f"f{k}.safetensors")
        assert (meta["crop_box"], meta["resized"]) == (image_meta["crop_box"], image_meta["resized"])
        for key in ("latent", "latent_flipped"):
            assert (clip[key][k] - image[key]).abs().max() <= 1e-4


def test_selection_by_step_fps_time_and_count_follows_the_formulas():
    stream = [(i, i / 24, None) for i in range(100)]

    def picked(**kw):
        return [i for i, _, _ in select(iter(stream), Selection(**kw))]

    assert picked(frame_step=3) == list(range(0, 100, 3))
    # --fps F: the first frame at or after each k/F
    assert picked(fps=10) == [int(np.ceil(k * 2.4 - 1e-9)) for k in range(42)]
    assert picked(start=1.0, end=2.0) == list(range(24, 48))
    assert picked(start=0.5, frame_step=5, max_frames=4) == [12, 17, 22, 27]
    assert picked(start=1.0, fps=6) == [24 + 4 * k for k in range(19)]


def test_selection_on_a_clip_picks_those_frames_of_the_full_encode(mp4_latent, weights, tmp_path, capsys):
    path, _, _ = mp4_latent
    _, full = _load(path)
    code, out, err = cli(capsys, "encode", _clip_path(path), "-o", tmp_path, "-w", weights, "--latent-dtype", "fp32",
                         "--fps", "3", "--start", "0.2", "--max-frames", "3", "--json")
    assert code == 0, err
    meta, part = _load(tmp_path / "pan.safetensors")
    # 8 fps source, slots of 1/3 s from 0.2 s: the first frame at or after 0.2, 0.533, 0.867 s
    assert json.loads(meta["frame_indices"]) == [2, 5, 7]
    assert json.loads(meta["timestamps"]) == pytest.approx([0.25, 0.625, 0.875])
    assert float(meta["fps"]) == 3 and meta["select_fps"] == "3.0"
    assert torch.equal(part["latent"], full["latent"][[2, 5, 7]])
    code, _, err = cli(capsys, "encode", _clip_path(path), "-o", tmp_path / "s", "-w", weights, "--frame-step", "4")
    meta, _ = _load(tmp_path / "s" / "pan.safetensors")
    assert json.loads(meta["frame_indices"]) == [0, 4, 8] and float(meta["fps"]) == FPS / 4


def _clip_path(latent: Path) -> Path:
    meta, _ = _load(latent)
    return Path(meta["source"])


# --- decode ---------------------------------------------------------------------------------------------------

def test_decode_writes_mp4_gif_webp_and_frame_folders(mp4_latent, weights, tmp_path, capsys):
    path, frame_latents, _ = mp4_latent
    dec = tmp_path / "dec"
    code, out, err = cli(capsys, "decode", path, "-o", dec, "--json")
    assert code == 0, err
    assert _records(out)[0]["output"] == str(dec / "pan.mp4")
    assert iio.improps(dec / "pan.mp4", plugin="pyav").shape == (T, H, W, 3)
    assert iio.immeta(dec / "pan.mp4", plugin="pyav")["fps"] == FPS
    for fmt in ("gif", "webp"):
        assert cli(capsys, "decode", path, "-o", dec, "--format", fmt)[0] == 0
        frames = list(iio.imiter(dec / f"pan.{fmt}", plugin="pillow"))
        assert len(frames) == T and frames[0].shape[:2] == (H, W)
        with Image.open(dec / f"pan.{fmt}") as im:
            im.seek(3)
            im.load()
            assert abs(im.info["duration"] - 1000 / FPS) <= 5  # 125 ms; GIF stores hundredths of a second
    assert cli(capsys, "decode", path, "-o", dec, "--format", "png")[0] == 0
    assert sorted(p.name for p in (dec / "pan").iterdir()) == [f"{k:06d}.png" for k in range(T)]
    # frame k of the folder == the image decode of frame k's own latent file (the image path)
    assert cli(capsys, "decode", frame_latents, "-o", tmp_path / "img", "-w", weights)[0] == 0
    for k in (0, 5, T - 1):
        assert np.array_equal(np.asarray(Image.open(dec / "pan" / f"{k:06d}.png")),
                              np.asarray(Image.open(tmp_path / "img" / f"{k:02d}.png")))
    # a rerun skips the finished video; --format mp4 for an image latent is that item's error
    code, out, err = cli(capsys, "decode", path, "-o", dec, "--format", "mp4", "--json")
    assert code == 0 and [r["status"] for r in _records(out)] == ["skipped"]
    code, out, err = cli(capsys, "decode", frame_latents / "00.safetensors", "-o", dec, "--format", "mp4",
                         "-w", weights, "--json")
    assert code == 1 and [r["status"] for r in _records(out)] == ["error"]
    assert "--format mp4 is for clips" in err and err.count("error:") == 1


# --- roundtrip ------------------------------------------------------------------------------------------------

def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255**2
    return 10 * np.log10(1 / mse)


def test_roundtrip_reports_per_frame_figures_and_writes_side_by_side(clips, weights, tmp_path, capsys):
    code, out, err = cli(capsys, "roundtrip", clips / "spin.webp", "-o", tmp_path / "rt", "-w", weights,
                         "--format", "png", "--json")
    assert code == 0, err
    (record,) = _records(out)
    assert record["output"] == str(tmp_path / "rt" / "spin")
    source = _pan_zoom(T)
    recon = np.stack([np.asarray(Image.open(tmp_path / "rt" / "spin" / f"{k:06d}.png")) for k in range(T)])
    psnrs = [_psnr(s, r) for s, r in zip(source, recon)]
    assert record["frames"] == T and record["fps"] == 8
    assert record["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-6)
    assert record["psnr_min"] == pytest.approx(min(psnrs), abs=1e-6)
    err_ = recon.astype(np.float64) / 255 - source.astype(np.float64) / 255
    assert record["flicker"] == pytest.approx(np.abs(np.diff(err_, axis=0)).mean(), rel=1e-5)
    from skimage.metrics import structural_similarity  # the paper's settings, as latentctl.metrics.ssim documents
    ssims = [structural_similarity(a / 255, b / 255, data_range=1, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False) for a, b in zip(source, recon)]
    assert record["ssim"] == pytest.approx(np.mean(ssims), abs=1e-6)
    assert record["ssim_min"] == pytest.approx(min(ssims), abs=1e-6)
    compare = np.asarray(Image.open(tmp_path / "rt" / "spin.compare" / "000003.png"))
    assert compare.shape == (H, 3 * W, 3) and np.array_equal(compare[:, W:2 * W], recon[3])
    # the same through encode + decode (fp16 storage, as roundtrip stores)
    assert cli(capsys, "encode", clips / "spin.webp", "-o", tmp_path / "lat", "-w", weights, "--max-frames", "4")[0] == 0
    assert cli(capsys, "decode", tmp_path / "lat", "-o", tmp_path / "dec", "--format", "png")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / "spin" / "000003.png")), recon[3])
    # a side-by-side video
    assert cli(capsys, "roundtrip", clips / "pan.mp4", "-o", tmp_path / "v", "-w", weights, "--max-frames", "3")[0] == 0
    assert iio.improps(tmp_path / "v" / "pan.compare.mp4", plugin="pyav").shape == (3, H, 3 * W, 3)


# --- bad inputs -----------------------------------------------------------------------------------------------

def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    return path


def _no_frames(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        c.start_encoding()
    return path


def _faststart(path: Path) -> Path:
    """An mp4 with its index (moov) before the data, so that a cut file still opens."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        rng = np.random.default_rng(1)
        for _ in range(24):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return path


def test_bad_clips_are_one_error_line_each_and_the_run_goes_on(clips, weights, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    whole = (clips / "pan.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    faststart = _faststart(bad / "cut_mid.mp4")  # its header is whole: frames stop decoding part-way
    faststart.write_bytes(faststart.read_bytes()[: faststart.stat().st_size * 2 // 3])
    (bad / "noise.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    gif = (clips / "hop.gif").read_bytes()
    (bad / "cut.gif").write_bytes(gif[: len(gif) * 2 // 3])
    _audio_only(bad / "audio.mp4")
    _no_frames(bad / "empty.mp4")
    (bad / "zero.mkv").write_bytes(b"")
    out_dir = tmp_path / "lat"
    code, out, err = cli(capsys, "encode", bad, clips / "spin.webp", "-o", out_dir, "-w", weights, "--json")
    assert code == 1
    status = {Path(r["input"]).name: (r["status"], r["error"]) for r in _records(out)}
    assert status.pop("spin.webp")[0] == "ok"
    assert set(status) == {"truncated.mp4", "noise.webm", "cut.gif", "audio.mp4", "empty.mp4", "zero.mkv",
                           "cut_mid.mp4"}
    assert all(s == "error" for s, _ in status.values())
    assert "only audio" in status["audio.mp4"][1] and "empty file" in status["zero.mkv"][1]
    assert "zero-frame" in status["empty.mp4"][1] and "truncated" in status["cut.gif"][1]
    assert "truncated" in status["cut_mid.mp4"][1] and "frame" in status["cut_mid.mp4"][1]
    lines = err.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 7 and "Traceback" not in err
    files = [p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file()]
    # nothing half-written: the good clip's file, and nothing else but hidden bookkeeping (progress files)
    assert [f.name for f in files if not any(part.startswith(".") for part in f.parts)] == ["spin.safetensors"]
    assert not [f for f in files if f.name.endswith((".latentctl-tmp", ".safetensors")) and f.name != "spin.safetensors"]
    code, out, err = cli(capsys, "encode", clips / "pan.mp4", "-o", tmp_path / "big", "-w", weights,
                         "--max-pixels", str(W * H - 1))
    assert code == 1 and f"{W}x{H}" in err and "--max-pixels" in err
    assert not [p for p in (tmp_path / "big").rglob("*") if p.is_file() and PROGRESS not in p.parts]


@pytest.mark.slow
def test_sigkill_mid_clip_leaves_no_partial_file(weights, tmp_path):
    clip = tmp_path / "long.mp4"
    iio.imwrite(clip, np.repeat(_pan_zoom(12, 32, 24), 20, axis=0), plugin="pyav", codec="libx264", fps=24)
    out = tmp_path / "lat"
    proc = subprocess.Popen([sys.executable, "-m", "latentctl", "encode", clip, "-o", out, "-w", weights,
                             "--batch-size", "2"], stderr=subprocess.PIPE)
    spool = None
    deadline = time.monotonic() + 120
    while spool is None and time.monotonic() < deadline and proc.poll() is None:
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():  # the spool: an unnamed file in the output folder
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(out)) and os.stat(fd).st_size > 0:
                spool = target
        time.sleep(0.05)
    assert spool is not None, "the encode never spooled a frame"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in out.rglob("*") if p.is_file() and PROGRESS not in p.parts]
    assert left == [".long.safetensors.latentctl-claim"]  # only the dead run's claim (it expires); no latent data
