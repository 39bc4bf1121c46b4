"""A dataset run that can be trusted (issue 13): no stale outputs, no silent omissions, no hangs, no input
overwritten. One test per finding; each fails on the code before this file. Small random-weight VAEs and tiny
images keep it fast; the cases that need a real process (a FIFO, signals) run `python -m latentctl`."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data

from conftest import run_main as cli
from latentctl import AEConfig, AutoencoderKL
from latentctl.pipeline import images
from latentctl.pipeline.latents import FORMAT


def _weights(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), folder / "vae.safetensors")
    (folder / "config.json").write_text(json.dumps({"scaling_factor": 0.5, "shift_factor": 0.1}))
    return folder / "vae.safetensors"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {"a": _weights(root / "a"), "b": _weights(root / "b", seed=1)}


PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def _img(path: Path, which: int, size=(20, 16), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(data, PHOTOS[which % len(PHOTOS)])()).convert("RGB").resize(size).save(path, fmt)
    return path




def _records(out: str) -> dict[str, dict]:
    """JSON lines by input file name (relative names are unique in these tests)."""
    return {Path(r["input"]).name: r for r in map(json.loads, filter(str.strip, out.splitlines()))}


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "latentctl", *map(str, args)]


# --- 1. stale outputs are redone, never trusted -----------------------------------------------------------------

def test_1_replaced_source_is_redone_and_verify_sources_hashes(weights, tmp_path, capsys):
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    for i, name in enumerate(("a.png", "b.png", "c.bmp")):
        _img(imgs / name, i)
    enc = ["encode", imgs, "-o", out, "-w", weights["a"], "--json"]
    assert cli(capsys, *enc)[0] == 0
    _img(imgs / "a.png", 3)  # another photo under the same name
    os.utime(imgs / "b.png")  # touched, same content: still done
    code, stdout, err = cli(capsys, *enc)
    rec = _records(stdout)
    assert code == 0, err
    assert (rec["a.png"]["status"], rec["a.png"].get("redone")) == ("ok", "source changed")
    assert rec["b.png"]["status"] == rec["c.bmp"]["status"] == "skipped"
    meta = _meta(out / "a.safetensors")
    assert meta["source_sha256"] == _sha(imgs / "a.png")
    assert meta["source_size"] == str((imgs / "a.png").stat().st_size) and meta["source_rel"] == "a.png"
    # new content with the old size (BMP: the size depends on the dimensions only) and the old mtime:
    # the fast path trusts it, --verify-sources hashes and redoes it
    st = (imgs / "c.bmp").stat()
    _img(imgs / "c.bmp", 4)
    assert (imgs / "c.bmp").stat().st_size == st.st_size
    os.utime(imgs / "c.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _records(cli(capsys, *enc)[1])["c.bmp"]["status"] == "skipped"
    rec = _records(cli(capsys, *enc, "--verify-sources")[1])["c.bmp"]
    assert (rec["status"], rec.get("redone")) == ("ok", "source changed")
    assert _meta(out / "c.safetensors")["source_sha256"] == _sha(imgs / "c.bmp")


def test_1_second_dataset_in_one_folder_is_redone_not_skipped(weights, tmp_path, capsys):
    out = tmp_path / "out"
    for i, name in enumerate(("x.png", "y.png")):
        _img(tmp_path / "setA" / name, i)
        _img(tmp_path / "setB" / name, i + 2)
    assert cli(capsys, "encode", tmp_path / "setA", "-o", out, "-w", weights["a"])[0] == 0
    code, stdout, err = cli(capsys, "encode", tmp_path / "setB", "-o", out, "-w", weights["a"], "--json")
    assert code == 0, err
    assert {(r["status"], r.get("redone")) for r in _records(stdout).values()} == {("ok", "other dataset")}
    for name in ("x", "y"):
        meta = _meta(out / f"{name}.safetensors")
        assert meta["source_path"] == str(tmp_path / "setB" / f"{name}.png")
        assert meta["source_sha256"] == _sha(tmp_path / "setB" / f"{name}.png")
    # the same files moved elsewhere (same content): still done
    (tmp_path / "setB").rename(tmp_path / "moved")
    stdout = cli(capsys, "encode", tmp_path / "moved", "-o", out, "-w", weights["a"], "--json")[1]
    assert {r["status"] for r in _records(stdout).values()} == {"skipped"}


def test_1_decode_redoes_images_of_other_latents_or_weights(weights, tmp_path, capsys):
    imgs, lat, dec = tmp_path / "imgs", tmp_path / "lat", tmp_path / "dec"
    _img(imgs / "a.png", 0)
    _img(imgs / "b.png", 1)
    assert cli(capsys, "encode", imgs, "-o", lat, "-w", weights["a"])[0] == 0
    assert cli(capsys, "decode", lat, "-o", dec)[0] == 0
    assert {r["status"] for r in _records(cli(capsys, "decode", lat, "-o", dec, "--json")[1]).values()} == {"skipped"}
    _img(imgs / "a.png", 4)
    assert cli(capsys, "encode", imgs, "-o", lat, "-w", weights["a"])[0] == 0  # a.safetensors is new
    rec = _records(cli(capsys, "decode", lat, "-o", dec, "--json")[1])
    assert (rec["a.safetensors"].get("redone"), rec["b.safetensors"]["status"]) == ("source changed", "skipped")
    toml = tmp_path / "b.toml"  # --model forces other weights on every file (--weights alone is only a fallback)
    toml.write_text(f'[b]\npath = "{weights["b"]}"\nch = 32\nch_mult = [1, 2]\nnum_res_blocks = 1\n'
                    'scaling_factor = 0.5\nshift_factor = 0.1\n')
    rec = _records(cli(capsys, "decode", lat, "-o", dec, "--json", "-m", "b", "--models", toml)[1])
    assert {(r["status"], r.get("redone")) for r in rec.values()} == {("ok", "settings changed")}


# --- 2. nothing silently left out ---------------------------------------------------------------------------

def test_2_symlinked_folders_are_walked_and_loops_cut(weights, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    _img(imgs / "a.png", 0)
    for i in range(3):
        _img(tmp_path / "other" / "d0" / f"s{i}.png", i)
    (imgs / "shard0").symlink_to(Path("..") / "other" / "d0")
    (tmp_path / "other" / "d0" / "loop").symlink_to(Path(".."))  # back up: other/ holds d0 again
    code, stdout, err = cli(capsys, "encode", imgs, "-o", tmp_path / "out", "-w", weights["a"], "--json")
    assert code == 0, err
    assert sorted(_records(stdout)) == ["a.png", "s0.png", "s1.png", "s2.png"]
    assert (tmp_path / "out" / "shard0" / "s1.safetensors").is_file()


def test_2_unreadable_folder_is_an_error(weights, tmp_path, capsys, monkeypatch):
    imgs = tmp_path / "imgs"
    _img(imgs / "a.png", 0)
    _img(imgs / "locked" / "b.png", 1)
    real = os.scandir

    def scandir(path="."):  # what chmod 000 gives a non-root user (this suite may run as root)
        if Path(path) == imgs / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, stdout, err = cli(capsys, "encode", imgs, "-o", tmp_path / "out", "-w", weights["a"], "--json")
    assert code == 1
    assert f"error: {imgs / 'locked'}: cannot read folder: Permission denied" in err.splitlines()
    assert "1 ok, 0 skipped, 1 failed of 2" in err


# --- 3. nothing hangs ---------------------------------------------------------------------------------------

def test_3_fifo_among_inputs_is_an_error_line_and_the_run_ends(weights, tmp_path):
    imgs = tmp_path / "imgs"
    _img(imgs / "a.png", 0)
    os.mkfifo(imgs / "fifo.png")
    started = time.monotonic()
    proc = subprocess.run(_command("encode", imgs, imgs / "fifo.png", "-", "-o", tmp_path / "out",
                                   "-w", weights["a"], "--json"),
                          input=f"{imgs / 'fifo.png'}\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 120
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "named pipe" in lines[0]  # named three times, one input, one line
    assert (tmp_path / "out" / "a.safetensors").is_file()


# --- 4. an input is never overwritten -----------------------------------------------------------------------

def test_4_outputs_that_are_inputs_are_refused_up_front(weights, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    _img(imgs / "horse.png", 0)
    before = _sha(imgs / "horse.png")
    code, _, err = cli(capsys, "roundtrip", imgs, "-o", imgs, "-w", weights["a"])
    assert code == 2 and "is an input file" in err and len(err.strip().splitlines()) == 1
    assert _sha(imgs / "horse.png") == before and os.listdir(imgs) == ["horse.png"]
    # through a link to the input folder, and for encode of a file named explicitly
    (tmp_path / "alias").symlink_to(imgs)
    assert cli(capsys, "roundtrip", imgs, "-o", tmp_path / "alias", "-w", weights["a"])[0] == 2
    save_file({"latent": torch.zeros(4, 2, 2)}, imgs / "z.safetensors")
    code, _, err = cli(capsys, "encode", imgs / "z.safetensors", "-o", imgs, "-w", weights["a"])
    assert code == 2 and "is an input file" in err
    assert _sha(imgs / "horse.png") == before


# --- 5. a name clash costs only the clashing inputs -------------------------------------------------------------

def test_5_name_clash_fails_only_the_twins_and_keep_ext_keeps_both(weights, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    _img(imgs / "a.jpg", 0)
    _img(imgs / "a.png", 1)
    _img(imgs / "b.png", 2)
    code, stdout, err = cli(capsys, "encode", imgs, "-o", tmp_path / "out", "-w", weights["a"], "--json")
    rec = _records(stdout)
    assert code == 1
    assert rec["a.jpg"]["status"] == rec["a.png"]["status"] == "error" and rec["b.png"]["status"] == "ok"
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 2
    assert not (tmp_path / "out" / "a.safetensors").exists()
    code, stdout, err = cli(capsys, "encode", imgs, "-o", tmp_path / "kept", "-w", weights["a"], "--keep-ext")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.safetensors")) == [
        "a.jpg.safetensors", "a.png.safetensors", "b.png.safetensors"]


# --- 6. output problems are found once, before the compute -----------------------------------------------------

def test_6_output_folder_that_cannot_be_made_or_written_is_one_line_before_the_model(tmp_path, capsys):
    _img(tmp_path / "imgs" / "a.png", 0)
    (tmp_path / "file").write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids; /sys refuses even root
        readonly = Path("/sys")
    # weights that cannot be loaded (garbage tensors, a config.json that gives the scale): the output error
    # comes first, so the folder was checked before the model was loaded
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vae.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")
    (broken / "config.json").write_text(json.dumps({"scaling_factor": 0.5, "shift_factor": 0.1}))
    code, _, err = cli(capsys, "encode", tmp_path / "imgs", "-o", tmp_path / "fine", "-w", broken / "vae.safetensors")
    assert code == 2 and "not a readable safetensors" in err  # these weights alone: a weights error
    for out, why in ((tmp_path / "file" / "sub", "not a folder"), (readonly, "not writable"),
                     (readonly / "new" / "deeper", "cannot be created")):
        code, _, err = cli(capsys, "encode", tmp_path / "imgs", "-o", out, "-w", broken / "vae.safetensors")
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, (out, err)


# --- 7. decode: where the NaN is; non-float latents and bad scales are per-file errors --------------------------

def test_7_decode_nan_int_and_bad_scale_files_are_each_an_error(weights, tmp_path, capsys):
    lat = tmp_path / "lat"
    lat.mkdir()
    meta = {"format": FORMAT, "scaling_factor": "0.5", "shift_factor": "0.1", "scaled": "true", "factor": "2"}
    z = torch.randn(4, 6, 5)
    nan = z.clone()
    nan[0, 1, 1] = float("nan")
    files = {"good": (z, meta), "nan": (nan, meta), "int": (z.round().long(), meta), "bool": (z > 0, meta),
             "inf-scale": (z, {**meta, "scaling_factor": "inf"}), "neg-scale": (z, {**meta, "scaling_factor": "-2"}),
             "nan-shift": (z, {**meta, "shift_factor": "nan"})}
    for name, (t, m) in files.items():
        save_file({"latent": t.contiguous()}, lat / f"{name}.safetensors", metadata=m)
    code, stdout, err = cli(capsys, "decode", lat, "-o", tmp_path / "dec", "-w", weights["a"], "--json")
    rec = {k.removesuffix(".safetensors"): r for k, r in _records(stdout).items()}
    assert code == 1 and rec["good"]["status"] == "ok"
    assert "stores NaN/inf" in rec["nan"]["error"]
    assert "int64" in rec["int"]["error"] and "bool" in rec["bool"]["error"]
    assert "scaling_factor inf" in rec["inf-scale"]["error"] and "scaling_factor -2" in rec["neg-scale"]["error"]
    assert "shift_factor nan" in rec["nan-shift"]["error"]
    assert sorted(p.name for p in (tmp_path / "dec").glob("*.png")) == ["good.png"]


# --- 8. one line per file name, NUL-separated stdin, 16-bit RGB, temp files -------------------------------------

def test_8_nul_separated_stdin_and_one_line_errors_for_any_name(weights, tmp_path, capsys, monkeypatch):
    odd = _img(tmp_path / "in" / "new\nline.png", 0)
    _img(tmp_path / "in" / "plain.png", 1)
    missing = str(tmp_path / "in" / "gone\n\x1b[31mred.png")
    stdin = f"{odd}\0{tmp_path / 'in' / 'plain.png'}\0{missing}\0"
    code, stdout, err = cli(capsys, "encode", "-", "-0", "-o", tmp_path / "out", "-w", weights["a"], "--json",
                            stdin=stdin, monkeypatch=monkeypatch)
    assert code == 1
    assert sorted(r["status"] for r in map(json.loads, stdout.splitlines())) == ["error", "ok", "ok"]
    assert (tmp_path / "out" / "new\nline.safetensors").is_file()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path}/in/gone\\n\\x1b[31mred.png: no such file"]


def _png16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PNG spec: IHDR bit depth 16, colour type 2; filter 0 rows, big-endian)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_8_16bit_rgb_png_is_read_at_full_precision(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (9, 13, 3), dtype=np.uint16)
    _png16(tmp_path / "deep.png", rgb)
    loaded = images.read_image((tmp_path / "deep.png").read_bytes(), max_pixels=10**6)
    assert loaded.rgb.shape == (9, 13, 3)
    assert np.abs(loaded.rgb - rgb / 65535.0).max() < 1e-6  # 8-bit would be up to 1/510 off


def test_8_temp_names_are_unique_and_stale_temps_are_cleaned(weights, tmp_path, capsys):
    from latentctl.pipeline import outputs

    target = tmp_path / "out" / "a.safetensors"
    assert outputs.temp_path(target) != outputs.temp_path(target)
    _img(tmp_path / "imgs" / "a.png", 0)
    (tmp_path / "out").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = outputs.temp_path(target).name.replace(f".{os.getpid()}-", f".{dead.pid}-")
    live = outputs.temp_path(target).name.replace(f".{os.getpid()}-", ".1-")  # pid 1 is alive
    for name in (stale, live, ".vanished.safetensors.latentctl-tmp"):  # the last: an older latentctl's name
        (tmp_path / "out" / name).write_bytes(b"partial")
    assert cli(capsys, "encode", tmp_path / "imgs", "-o", tmp_path / "out", "-w", weights["a"])[0] == 0
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(outputs.TEMP_SUFFIX)
                  or p.suffix == ".safetensors")
    assert left == sorted(["a.safetensors", live])


# --- 3. signals: at start-up and mid-run, clean exits ----------------------------------------------------------

def _no_partial(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(".latentctl-tmp")]
    for path in out.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert f.get_tensor("latent").shape[0] == 4


def _wait_for_handler(pid: int, sig: int, timeout: float = 60) -> None:
    """Until process pid catches sig (Linux: the SigCgt mask in /proc/PID/status). A signal that arrives while
    CPython itself is still starting (before any Python code can install a handler) kills it uncleanly; on a
    loaded machine that start can take longer than any fixed sleep."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} installed no handler for signal {sig} in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_3_signal_at_start_up_exits_cleanly(sig, weights, tmp_path):
    """During the imports (0.4 s in): exit 130/143, one line, no traceback. (benchmarks/drills.py repeats this at
    random moments of the first 2 s.)"""
    _img(tmp_path / "imgs" / "a.png", 0)
    proc = subprocess.Popen(_command("encode", tmp_path / "imgs", "-o", tmp_path / "out", "-w", weights["a"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_handler(proc.pid, signal.SIGTERM)   # latentctl's first line ran; the heavy imports come after it
    time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    _no_partial(tmp_path / "out")


def _latents_in(out: Path) -> list[Path]:
    """The latents in `out` so far; none while it does not exist, including the moment between the output check's
    test folder (made and removed before the model loads, pipeline/outputs.py) and the run's own."""
    try:
        return list(out.glob("*.safetensors"))
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_3_signal_mid_run_finishes_writes_and_exits_130_or_143(sig, weights, tmp_path):
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    for i in range(24):
        _img(imgs / f"{i:02d}.png", i, size=(48, 40))
    proc = subprocess.Popen(_command("encode", imgs, "-o", out, "-w", weights["a"], "--batch-size", "1",
                                     "--workers", "1", "-q"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not _latents_in(out):
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert "interrupted" in err
    _no_partial(out)
    assert 0 < len(list(out.glob("*.safetensors"))) < 24


# --- issue 14, item 8: one path mapping for arguments and stdin ---------------------------------------------------

def test_stdin_and_arguments_map_to_the_same_outputs(weights, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big"
    x, y = _img(big / "b" / "x.png", 0), _img(big / "c" / "y.png", 1)
    monkeypatch.chdir(tmp_path)  # stdin paths relative to the current folder, as `find big ...` prints them

    def outputs_of(out: str, *args, stdin=None) -> list[str]:
        code, stdout, err = cli(capsys, "encode", *args, "-o", out, "-w", weights["a"], "--json",
                                stdin=stdin, monkeypatch=monkeypatch)
        assert code == 0, err
        return sorted(Path(r["output"]).relative_to(out).as_posix() for r in _records(stdout).values())

    want = outputs_of("o1", big)
    assert want == ["b/x.safetensors", "c/y.safetensors"]
    assert outputs_of("o2", "-", stdin="big/b/x.png\nbig/c/y.png\n") == want          # find big -name '*.png' | ...
    assert outputs_of("o3", x, "-", stdin="big/c/y.png\n") == want                   # mixed: one each way
    assert outputs_of("o4", "-", "--root", big, stdin="big/b/x.png\n") == ["b/x.safetensors"]  # a part, same path
