"""WebDataset tar shards in and out, the index, `latentctl verify`: shards made here with tarfile (and hostile
ones), the output read back by the `webdataset` package as an independent reader, latents compared with the
one-file-per-image mode of the same images."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from skimage import data

from conftest import run_main as cli
from latentctl import AEConfig, AutoencoderKL
from latentctl.pipeline import sources

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    path = tmp_path_factory.mktemp("model") / "vae.safetensors"
    save_file(vae.state_dict(), path)
    (path.parent / "config.json").write_text(json.dumps({"scaling_factor": 0.5, "shift_factor": 0.1}))
    return path


def _jpeg(i: int, size=(24, 16)) -> bytes:
    im = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB").resize(size, Image.LANCZOS)
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, blob: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(blob))


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, blob in members.items():
                _add(tar, f"{key}.{ext}", blob)
    return path


def _caption(s: int, i: int) -> bytes:
    return f"a photo, shard {s} sample {i} \u00e9\n".encode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two image shards in the img2dataset layout (jpg + txt + json per sample, a parquet and stats beside)."""
    d = tmp_path_factory.mktemp("shards")
    for s in range(2):
        _shard(d / f"{s:05d}.tar", [(f"{s}{i:04d}", {"jpg": _jpeg(s * 3 + i, (24 + 8 * (i % 2), 16)),
                                                     "txt": _caption(s, i),
                                                     "json": json.dumps({"key": f"{s}{i:04d}"}).encode()})
                                    for i in range(3)])
        (d / f"{s:05d}.parquet").write_bytes(b"not an input")
        (d / f"{s:05d}_stats.json").write_text("{}")
    return d




def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _loose(shard_dir: Path, folder: Path) -> Path:
    """The shards' images as loose files (the reference run)."""
    for shard in sorted(shard_dir.glob("*.tar")):
        for name, blob in _members(shard).items():
            if name.endswith(".jpg"):
                (folder / shard.stem).mkdir(parents=True, exist_ok=True)
                (folder / shard.stem / name).write_bytes(blob)
    return folder


# --- tar shards in ------------------------------------------------------------------------------------------------

def test_brace_notation_and_key_rule():
    assert sources.expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert sources.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert sources.split_name("dir/000123.seg.png") == ("dir/000123", "seg.png")
    assert sources.split_name("a.b/c.jpg") == ("a.b/c", "jpg")
    assert sources.split_name("noext") is None


def test_tar_shards_to_files_equal_loose_files_and_carry_members(shards, weights, tmp_path, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    code, stdout, err = cli(capsys, "encode", shards, "-o", out, "-w", weights, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in stdout.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(f"{shards / f'{s:05d}.tar'}:{s}{i:04d}"
                                                         for s in range(2) for i in range(3))
    code, _, err = cli(capsys, "encode", _loose(shards, tmp_path / "loose"), "-o", ref, "-w", weights, "-q")
    assert code == 0, err
    for s in range(2):
        for i in range(3):
            key = f"{s}{i:04d}"
            got = st_load((out / f"{s:05d}" / f"{key}.safetensors").read_bytes())["latent"]
            want = st_load((ref / f"{s:05d}" / f"{key}.safetensors").read_bytes())["latent"]
            assert torch.equal(got, want)
            assert (out / f"{s:05d}" / f"{key}.txt").read_bytes() == _caption(s, i)  # carried byte for byte
            assert json.loads((out / f"{s:05d}" / f"{key}.json").read_bytes()) == {"key": key}
    assert not list(out.rglob("*.parquet.*")) and not (out / "00000_stats.json").exists()


def test_shards_written_by_webdatasets_shardwriter(weights, tmp_path, capsys):
    import webdataset as wds

    (tmp_path / "in").mkdir()
    with wds.ShardWriter(str(tmp_path / "in" / "part-%04d.tar"), maxcount=2) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i:03d}", "jpg": _jpeg(i), "txt": f"caption {i}"})
    code, _, err = cli(capsys, "encode", f"{tmp_path}/in/part-{{0000..0001}}.tar", "-o", tmp_path / "out",
                       "-w", weights, "--to", "wds")
    assert code == 0 and "3 ok" in err, err
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(3):
        (loose / f"s{i:03d}.jpg").write_bytes(_jpeg(i))
    assert cli(capsys, "encode", loose, "-o", tmp_path / "ref", "-w", weights, "-q")[0] == 0
    got = {s["__key__"]: s for s in wds.WebDataset(f"{tmp_path}/out/part-{{0000..0001}}.tar", shardshuffle=False)}
    assert sorted(got) == ["s000", "s001", "s002"]
    for key, sample in got.items():
        want = st_load((tmp_path / "ref" / f"{key}.safetensors").read_bytes())["latent"]
        assert torch.equal(st_load(sample["latent.safetensors"])["latent"], want)
        assert sample["txt"] == f"caption {int(key[1:])}".encode()


# --- tar shards out -------------------------------------------------------------------------------------------

def test_wds_output_read_by_webdataset_equals_per_file_mode(shards, weights, tmp_path, capsys):
    import webdataset as wds

    out, ref = tmp_path / "wds", tmp_path / "files"
    code, _, err = cli(capsys, "encode", f"{shards}/{{00000..00001}}.tar", "-o", out, "-w", weights, "--to", "wds")
    assert code == 0, err
    assert cli(capsys, "encode", shards, "-o", ref, "-w", weights, "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.parquet", "00000.tar", "00000_stats.json",
                                                      "00001.parquet", "00001.tar", "00001_stats.json",
                                                      "index.parquet"]
    seen = {}
    # the 3-line decoder README shows
    dataset = wds.WebDataset(f"{out}/{{00000..00001}}.tar", shardshuffle=False).map(
        lambda s: (s["__key__"], st_load(s["latent.safetensors"])["latent"], s["txt"].decode()))
    for key, latent, caption in dataset:
        seen[key] = (latent, caption)
    assert sorted(seen) == [f"{s}{i:04d}" for s in range(2) for i in range(3)]
    for key, (latent, caption) in seen.items():
        s = int(key[0])
        per_file = ref / f"{s:05d}" / f"{key}.safetensors"
        assert torch.equal(latent, st_load(per_file.read_bytes())["latent"])
        assert caption.encode() == _caption(s, int(key[1:]))
        # same bytes as the per-file format (metadata included)
        assert _members(out / f"{s:05d}.tar")[f"{key}.latent.safetensors"] == per_file.read_bytes()
    stats = json.loads((out / "00001_stats.json").read_text())
    assert (stats["status"], stats["ok"], stats["failed"], stats["errors"]) == ("done", 3, 0, {})
    assert stats["settings"]["store"] == "mean" and stats["seconds"] > 0
    # the index says where each latent's bytes are
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert len(rows) == 6
    for r in rows:
        with open(out / r["path"], "rb") as f:
            f.seek(r["offset"])
            blob = f.read(r["size"])
        assert blob == _members(out / r["path"])[r["member"]]
        assert list(st_load(blob)["latent"].shape) == r["shape"]
        assert r["caption"].encode() == _caption(int(r["key"][0]), int(r["key"][1:]))


def test_rerun_skips_done_shards_and_redoes_a_changed_one(shards, weights, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for p in shards.glob("*.tar"):
        (src / p.name).write_bytes(p.read_bytes())
    assert cli(capsys, "encode", src, "-o", out, "-w", weights, "--to", "wds", "-q")[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    code, _, err = cli(capsys, "encode", src, "-o", out, "-w", weights, "--to", "wds")
    assert code == 0 and "0 ok, 6 skipped" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    _shard(src / "00001.tar", [("new0", {"jpg": _jpeg(4), "txt": b"changed"})])
    code, _, err = cli(capsys, "encode", src, "-o", out, "-w", weights, "--to", "wds")
    assert code == 0 and "1 ok, 3 skipped" in err, err
    assert (out / "00000.tar").stat().st_mtime_ns == before["00000.tar"]
    assert sorted(_members(out / "00001.tar")) == ["new0.latent.safetensors", "new0.txt"]
    assert sorted(r["key"] for r in pq.read_table(out / "index.parquet").to_pylist()) == ["00000", "00001",
                                                                                           "00002", "new0"]
    # other settings: the shards are redone, not mixed
    code, _, err = cli(capsys, "encode", src, "-o", out, "-w", weights, "--to", "wds", "--latent-dtype", "fp32")
    assert code == 0 and "4 ok, 0 skipped" in err, err


def test_loose_files_to_shards_of_n(shards, weights, tmp_path, capsys):
    loose = _loose(shards, tmp_path / "loose")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "encode", loose, "-o", out, "-w", weights, "--to", "wds", "--shard-size", "4")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert [len(_members(out / n)) for n in ("00000.tar", "00001.tar")] == [4, 2]
    assert "00000/00000.latent.safetensors" in _members(out / "00000.tar")
    code, _, err = cli(capsys, "encode", loose, "-o", out, "-w", weights, "--to", "wds", "--shard-size", "4")
    assert code == 0 and "0 ok, 6 skipped" in err, err


# --- hostile tars ---------------------------------------------------------------------------------------------

def test_hostile_tars_are_item_or_shard_errors_and_touch_nothing_outside(weights, tmp_path, capsys):
    d, out = tmp_path / "in", tmp_path / "run" / "out"
    d.mkdir()
    victim = tmp_path / "victim"
    with tarfile.open(d / "bad.tar", "w") as tar:
        _add(tar, "good.jpg", _jpeg(0))
        _add(tar, "good.txt", b"fine")
        _add(tar, f"{victim}/abs.jpg", _jpeg(1))           # absolute name
        _add(tar, "../../up.jpg", _jpeg(2))                 # escapes with ..
        info = tarfile.TarInfo("link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
        _add(tar, "textonly.txt", b"no image")              # a sample with no image
        _add(tar, "good.png", _jpeg(3))                     # duplicate key, later in the shard
        _add(tar, "noext", b"x")
    (d / "notatar.tar").write_bytes(b"this is not a tar file" * 50)
    whole = _shard(tmp_path / "whole.tar", [(f"k{i}", {"jpg": _jpeg(i), "txt": b"t"}) for i in range(4)])
    (d / "cut.tar").write_bytes(whole.read_bytes()[:3 * 1024 + 700])  # cut inside the 2nd sample's image
    code, out_text, err = cli(capsys, "encode", d, "-o", out, "-w", weights, "--to", "wds", "--json")
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    text = "\n".join(errors)
    for expected in ("absolute member name", "member name with '..'", "is a link", "no image member",
                     "duplicate key", "without an extension", "notatar.tar: cannot read shard: not a tar file",
                     "cut.tar: shard truncated or corrupt"):
        assert expected in text, (expected, text)
    assert len(errors) == 9, text  # 6 in bad.tar; cut.tar: the broken sample and the shard; notatar.tar
    assert not victim.exists() and not (tmp_path / "up.jpg").exists() and not (tmp_path / "run" / "up.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "run", "whole.tar"]
    # every shard still completes, its stats counting what failed
    bad = json.loads((out / "bad_stats.json").read_text())
    assert (bad["ok"], bad["failed"]) == (1, 6) and "textonly" in bad["errors"]
    assert sorted(_members(out / "bad.tar")) == ["good.latent.safetensors", "good.txt"]
    cut = json.loads((out / "cut_stats.json").read_text())
    assert cut["ok"] == 1 and cut["shard_error"].startswith("shard truncated")
    assert json.loads((out / "notatar_stats.json").read_text())["shard_error"].startswith("cannot read shard")


def test_a_member_over_the_size_limit_is_not_read(tmp_path):
    path = _shard(tmp_path / "s.tar", [("a", {"jpg": b"x" * 5000, "txt": b"ok"}), ("b", {"jpg": b"y" * 10})])
    shard = sources.discover_shards([str(path)])[0]
    items = list(sources.samples(shard, max_member=1000))
    assert [(i.key, i.error is not None) for i in items] == [("a", True), ("b", False)]
    assert "5000 bytes (limit 1000)" in items[0].error and items[1].data == b"y" * 10 and shard.total == 2


# --- decode, verify, kill -9 --------------------------------------------------------------------------------------

def test_latent_shards_decode_like_per_file_latents(shards, weights, tmp_path, capsys):
    wds_out, files_out = tmp_path / "wds", tmp_path / "files"
    assert cli(capsys, "encode", shards, "-o", wds_out, "-w", weights, "--to", "wds", "-q")[0] == 0
    assert cli(capsys, "encode", shards, "-o", files_out, "-w", weights, "-q")[0] == 0
    code, _, err = cli(capsys, "decode", wds_out, "-o", tmp_path / "img-wds", "-q")  # model from the metadata
    assert code == 0, err
    assert cli(capsys, "decode", files_out, "-o", tmp_path / "img-files", "-q")[0] == 0
    for s in range(2):
        for i in range(3):
            key = f"{s}{i:04d}"
            a = np.asarray(Image.open(tmp_path / "img-wds" / f"{s:05d}" / f"{key}.png"))
            b = np.asarray(Image.open(tmp_path / "img-files" / f"{s:05d}" / f"{key}.png"))
            assert a.shape == (16, 24 + 8 * (i % 2), 3) and np.array_equal(a, b)
            assert (tmp_path / "img-wds" / f"{s:05d}" / f"{key}.txt").read_bytes() == _caption(s, i)


def _nan_in_member(out: Path, row: dict) -> None:
    """Overwrite the first latent value of an indexed shard member with an fp16 NaN (the tar stays valid)."""
    with open(out / row["path"], "r+b") as f:
        f.seek(row["offset"])
        n = int.from_bytes(f.read(8), "little")
        f.seek(row["offset"] + 8 + n)
        f.write(b"\x00\x7e")


def test_verify_passes_a_good_cache_and_catches_corruption(shards, weights, tmp_path, capsys):
    out, files = tmp_path / "wds", tmp_path / "files"
    assert cli(capsys, "encode", shards, "-o", out, "-w", weights, "--to", "wds", "-q")[0] == 0
    assert cli(capsys, "encode", shards, "-o", files, "-w", weights, "-q")[0] == 0
    code, stdout, err = cli(capsys, "verify", out, "--sources", "--json")
    assert code == 0 and "6 latents ok in 2 shards" in err and "0 problems" in err, err
    assert len(stdout.splitlines()) == 6
    assert cli(capsys, "verify", files, "--sources")[0] == 0
    rows = pq.read_table(out / "index.parquet").to_pylist()
    _nan_in_member(out, rows[0])                                           # a NaN in a latent
    data_ = (out / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data_[:len(data_) // 2])              # a shard cut in half
    (files / "00000" / "00001.safetensors").write_bytes(b"garbage")        # a file that is not a latent
    (files / "00001" / "10000.safetensors").unlink()                       # a file the index lists, gone
    code, _, err = cli(capsys, "verify", out)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err
    assert any("NaN/inf" in line and f"00000.tar:{rows[0]['key']}" in line for line in errors), errors
    assert any("00001.tar" in line and "truncated" in line for line in errors), errors
    assert any("00001.tar" in line and "stats say 3" in line for line in errors), errors
    assert "Traceback" not in err
    code, _, err = cli(capsys, "verify", files)
    assert code == 1
    assert "00001.safetensors: not a readable safetensors file" in err
    assert "10000.safetensors: listed in index.parquet, but missing" in err
    # a source changed since it was encoded
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    Image.fromarray(data.camera()[:16, :24]).save(src / "a.png")
    assert cli(capsys, "encode", src, "-o", tmp_path / "lat", "-w", weights, "-q")[0] == 0
    Image.fromarray(data.camera()[16:32, :24]).save(src / "a.png")
    code, _, err = cli(capsys, "verify", tmp_path / "lat", "--sources")
    assert code == 1 and "has changed since it was encoded" in err


@pytest.mark.slow
def test_kill_9_mid_shard_then_rerun_every_sample_once(weights, tmp_path):
    import webdataset as wds

    src, out = tmp_path / "src", tmp_path / "out"
    for s in range(2):
        _shard(src / f"{s:05d}.tar", [(f"{s}{i:04d}", {"jpg": _jpeg(i, (48, 32)), "txt": b"c"}) for i in range(10)])
    cmd = [sys.executable, "-m", "latentctl", "encode", src, "-o", out, "-w", weights, "--to", "wds",
           "--batch-size", "1", "--workers", "1", "-q"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        temps = list(out.glob(".*.latentctl-tmp")) if out.exists() else []
        if (out / "00000_stats.json").exists() and temps and temps[0].stat().st_size > 0:
            break  # one shard done, the next one half-written
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    visible = sorted(p.name for p in out.glob("*.tar"))
    assert visible and all((out / f"{p[:-4]}_stats.json").exists() for p in visible)  # no partial shard shows
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not list(out.glob(".*latentctl-tmp"))
    keys = [s["__key__"] for s in wds.WebDataset(f"{out}/{{00000..00001}}.tar", shardshuffle=False)]
    assert sorted(keys) == sorted(f"{s}{i:04d}" for s in range(2) for i in range(10))  # each exactly once
    assert len(pq.read_table(out / "index.parquet")) == 20


_IMG2DATASET = """
import sys
from img2dataset import download
if __name__ == "__main__":
    download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
             output_folder=sys.argv[2], output_format="webdataset", image_size=32, resize_mode="no",
             processes_count=1, thread_count=2, number_sample_per_shard=2, distributor="multiprocessing",
             enable_wandb=False, timeout=120, retries=3)  # a loaded test machine is slow even for file://
"""


@pytest.mark.slow
def test_an_img2dataset_output_folder_encodes_as_it_is(weights, tmp_path, capsys):
    import pyarrow as pa

    photos = tmp_path / "photos"
    photos.mkdir()
    names = ("coffee", "chelsea", "rocket")  # not the default model's held-out photos
    for n in names:
        Image.fromarray(getattr(data, n)()).convert("RGB").resize((48, 32)).save(photos / f"{n}.jpg")
    pq.write_table(pa.table({"url": [(photos / f"{n}.jpg").as_uri() for n in names],
                             "caption": [f"a photo of {n}" for n in names]}), tmp_path / "list.parquet")
    (tmp_path / "i2d.py").write_text(_IMG2DATASET)
    made = subprocess.run([sys.executable, str(tmp_path / "i2d.py"), str(tmp_path / "list.parquet"),
                           str(tmp_path / "i2d")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})  # no update check over the network
    assert made.returncode == 0, made.stderr[-2000:]
    i2d = tmp_path / "i2d"
    assert sorted(p.name for p in i2d.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (i2d / "00000.parquet").exists() and (i2d / "00000_stats.json").exists()
    # batch size 1 on both sides: a batch of other images may round the last bit differently on a CPU
    code, _, err = cli(capsys, "encode", i2d, "-o", tmp_path / "out", "-w", weights, "--to", "wds", "--batch-size", "1")
    assert code == 0 and "3 ok" in err, err
    loose = _loose(i2d, tmp_path / "loose")
    assert cli(capsys, "encode", loose, "-o", tmp_path / "ref", "-w", weights, "-q", "--batch-size", "1")[0] == 0
    for shard in ("00000", "00001"):
        source, out = _members(i2d / f"{shard}.tar"), _members(tmp_path / "out" / f"{shard}.tar")
        for name, blob in source.items():
            key, ext = sources.split_name(name)
            if ext == "jpg":
                want = (tmp_path / "ref" / shard / f"{key}.safetensors").read_bytes()
                assert torch.equal(st_load(out[f"{key}.latent.safetensors"])["latent"], st_load(want)["latent"])
            else:
                assert out[name] == blob  # .txt and .json carried byte for byte
    assert cli(capsys, "verify", tmp_path / "out", "--sources")[0] == 0
