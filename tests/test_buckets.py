"""Aspect buckets: the preset lists against kohya's rule and SDXL's published list, bucket choice against a brute
force formula and hand-computed cases, crop boxes and SDXL conditioning by hand, and `encode --buckets --flip`
end to end (the flipped latent against a plain encode of the mirrored crop, made with pillow)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_main as cli
from latentctl import AEConfig, AutoencoderKL
from latentctl import buckets as B
from latentctl.errors import UsageError

# SDXL's bucket list as published with the model (height, width; aspect 0.25 .. 4), typed in from the paper
SDXL_PUBLISHED = {(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
                  (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
                  (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024)}
SDXL_PUBLISHED |= {(w, h) for h, w in SDXL_PUBLISHED}

# kohya's sd-scripts at --resolution 512 (min_bucket_reso 256, max 1024, steps of 64), worked out by hand:
# width 256 -> 1024, 320 -> 768, 384 -> 640, 448 -> 576, 512 -> 512, 576 -> 448, 640 -> 384, 704 -> 320,
# 768 -> 320, 832..1024 -> 256, and each transposed
SD15_KOHYA = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (320, 704), (256, 832), (256, 896),
              (256, 960)}
SD15_KOHYA |= {(h, w) for w, h in SD15_KOHYA}


def kohya_rule(area_side: int, lo: int, hi: int, step: int = 64) -> set:
    """kohya's make_bucket_resolutions as its docs state it, written out for a check: per width, the largest
    height in steps whose area stays within the target (at most `hi`); both orientations; plus the square."""
    units = (area_side // step) ** 2  # area in step x step cells
    out = {(area_side // step * step,) * 2}
    for w in range(lo, hi + 1, step):
        h = min(hi, units // (w // step) * step)
        out |= {(w, h), (h, w)}
    return out


def test_preset_lists_match_kohya_and_sdxl():
    assert set(B.parse("sd15").sizes) == SD15_KOHYA == kohya_rule(512, 256, 1024)
    sdxl = set(B.parse("sdxl").sizes)
    assert sdxl == kohya_rule(1024, 512, 2048)
    assert sdxl <= SDXL_PUBLISHED and len(sdxl) == 33  # kohya's rule keeps one height per width of SDXL's 40
    assert set(B.parse("flux").sizes) == sdxl


@pytest.mark.parametrize("name,side", [("sd15", 512), ("sdxl", 1024), ("flux", 1024)])
def test_presets_are_multiples_of_64_near_the_area(name, side):
    for w, h in B.parse(name).sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.8 * side * side <= w * h <= side * side
        assert max(w, h) / min(w, h) <= 4


def _nearest_by_formula(sizes, w, h):
    errors = np.abs(np.log([bw / bh for bw, bh in sizes]) - math.log(w / h))
    best = errors.min()
    ties = [s for s, e in zip(sizes, errors) if e <= best + 1e-9]
    return ties


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_nearest_bucket_is_the_nearest_log_aspect(name):
    buckets = B.parse(name)
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 6000, size=(300, 2)):
        got = B.nearest(buckets, int(w), int(h))
        assert got in _nearest_by_formula(buckets.sizes, int(w), int(h))


HAND = {  # preset, image (w, h) -> bucket (w, h), worked out by hand from the aspect ratios
    ("sd15", 1900, 1000): (640, 384),    # 1.9: 640/384 = 1.667 is 1.14x off, 704/320 = 2.2 is 1.158x off
    ("sd15", 1000, 3000): (256, 832),    # 0.333: 256/832 = 0.308 is 1.083x off, 320/768 = 0.417 1.25x
    ("sd15", 777, 777): (512, 512),
    ("sd15", 10, 10): (512, 512),        # tiny: upscaled by default
    ("sd15", 20000, 20000): (512, 512),  # huge
    ("sd15", 5000, 100): (1024, 256),    # wider than any bucket: the widest
    ("sdxl", 1920, 1080): (1344, 768),   # 1.778: 1344/768 = 1.75
    ("sdxl", 1080, 1920): (768, 1344),
    ("sdxl", 4000, 3000): (1152, 896),   # 1.333: 1152/896 = 1.286 is 1.037x off, 1216/832 = 1.462 1.096x
    ("sdxl", 64, 64): (1024, 1024),
    ("sdxl", 100, 5000): (512, 2048),
    ("flux", 1920, 1080): (1344, 768),
}


@pytest.mark.parametrize("case", sorted(HAND))
def test_bucket_by_hand(case):
    name, w, h = case
    assert B.nearest(B.parse(name), w, h) == HAND[case]


def test_cover_crop_and_sdxl_conditioning_by_hand():
    p = B.place(B.parse("sdxl"), 1920, 1080)
    # bucket 1344x768: heights match (1920/1080 is wider), width 1920 * 768 / 1080 = 1365.3 -> 1365
    assert p.bucket == (1344, 768) and p.resized == (1365, 768)
    assert p.box == (10, 0, 1354, 768)            # (1365 - 1344) // 2 = 10
    assert p.flipped_box == (11, 0, 1355, 768)    # the same pixels in the mirrored image: 1365 - 1354 = 11
    m = B.metadata(p, flipped=True)
    assert m == {"bucket": "1344x768", "original_size": "1080,1920", "crop_top_left": "0,10",
                 "target_size": "768,1344", "upscaled": "false", "crop_box_flipped": "11,0,1355,768",
                 "crop_top_left_flipped": "0,11"}
    tall = B.place(B.parse("sd15"), 1000, 3000)   # 256x832: widths match, 3000 * 256 / 1000 = 768 < 832
    assert tall.resized == (277, 832) and tall.box == (10, 0, 266, 832)   # 832 / 3000 * 1000 = 277.3


def test_random_crop_is_reproducible_and_spread():
    boxes = [B.crop_box((300, 200), (128, 128), "random", seed=7, key=f"img{i}.png") for i in range(200)]
    again = [B.crop_box((300, 200), (128, 128), "random", seed=7, key=f"img{i}.png") for i in range(200)]
    other = [B.crop_box((300, 200), (128, 128), "random", seed=8, key=f"img{i}.png") for i in range(200)]
    assert boxes == again and boxes != other
    lefts, tops = {b[0] for b in boxes}, {b[1] for b in boxes}
    assert min(lefts) >= 0 and max(lefts) <= 172 and min(tops) >= 0 and max(tops) <= 72
    assert len(lefts) > 50 and len(tops) > 30 and max(lefts) > 150 and min(lefts) < 20
    assert all(b[2] - b[0] == 128 and b[3] - b[1] == 128 for b in boxes)


def test_too_small_rule():
    sd15 = B.parse("sd15")
    p = B.place(sd15, 300, 300)
    assert p.upscaled and p.resized == (512, 512)
    with pytest.raises(B.TooSmall, match="300x300 is smaller than its bucket 512x512"):
        B.place(sd15, 300, 300, too_small="skip")
    assert not B.place(sd15, 512, 512, too_small="skip").upscaled
    with pytest.raises(B.TooSmall):
        B.place(sd15, 540, 500, too_small="skip")  # 512x512 bucket (1.08 is nearest 1:1), but 500 < 512 high


def test_apply_crops_the_pixels_when_no_resize_is_needed():
    rgb = np.random.default_rng(1).random((64, 80, 3), dtype=np.float32)
    p = B.place(B.parse("64x64,128x64"), 80, 64)  # nearest 64x64 (1.25 vs 2): height fits, no resize
    x, p2 = B.prepare(rgb, B.parse("64x64,128x64"), crop="center")
    assert p == p2 and p.resized == (80, 64) and p.box == (8, 0, 72, 64)
    np.testing.assert_allclose(((x + 1) / 2).permute(1, 2, 0).numpy(), rgb[:, 8:72], atol=1e-6)


def test_parse_custom_and_errors():
    assert B.parse("area=64x64,step=16").sizes == B.generate(64 * 64, 16, 32, 128)
    assert B.parse("area=512").sizes == B.parse("sd15").sizes
    assert B.parse("512x768, 768x512").sizes == ((512, 768), (768, 512))
    for bad in ["", "area=x", "step=64", "foo=1,area=512", "12x", "0x64", "area=64,step=0"]:
        with pytest.raises(UsageError):
            B.parse(bad)
    with pytest.raises(UsageError, match="factor 16"):
        B.check_factor(B.parse("72x64"), 16)


# --- encode --buckets end to end ----------------------------------------------------------------------------



def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))  # factor 2
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(vae.state_dict(), path)
    # raw latents, said so: weights need a stated scale to be encoded with (issue 14)
    (path.parent / "config.json").write_text('{"scaling_factor": 1.0, "shift_factor": 0.0}')
    return path


def _photo(w, h):
    from skimage import data
    return Image.fromarray(data.astronaut()).resize((w, h), Image.LANCZOS)


def test_flip_latent_equals_encoding_the_mirrored_crop(vae_file, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _photo(80, 64).save(imgs / "a.png")   # bucket 64x64 (80x64 is nearer 1:1 than 2:1): no resize, crop 8..72
    code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "lat", "-w", vae_file, "--buckets", "64x64,128x64",
                         "--flip", "--latent-dtype", "fp32", "-q")
    assert code == 0, err
    meta, t = _tensors(tmp_path / "lat" / "a.safetensors")
    assert meta["crop_box"] == "8,0,72,64" and meta["crop_box_flipped"] == "8,0,72,64"
    # second code path: pillow crops and mirrors; a plain encode (no buckets) of that file
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.open(imgs / "a.png").crop((8, 0, 72, 64)).save(ref / "plain.png")
    Image.open(imgs / "a.png").crop((8, 0, 72, 64)).transpose(Image.FLIP_LEFT_RIGHT).save(ref / "mirror.png")
    assert cli(capsys, "encode", ref, "-o", tmp_path / "reflat", "-w", vae_file, "--latent-dtype", "fp32", "-q")[0] == 0
    _, plain = _tensors(tmp_path / "reflat" / "plain.safetensors")
    _, mirror = _tensors(tmp_path / "reflat" / "mirror.safetensors")
    torch.testing.assert_close(t["latent"], plain["latent"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["latent_flipped"], mirror["latent"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t["latent_flipped"], t["latent"].flip(-1), atol=1e-3)  # not a mirrored latent


def test_encode_records_bucket_and_sdxl_values(vae_file, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _photo(150, 70).save(imgs / "wide.png")     # 2.14 -> 128x64; 150 * 64 / 70 = 137.1 -> 137 wide
    _photo(64, 200).save(imgs / "tall.png")     # 0.32 -> 64x128; 200 * 64 / 64 = 200 high
    _photo(20, 20).save(imgs / "tiny.png")      # smaller than 64x64: skipped with --too-small skip
    code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "lat", "-w", vae_file, "--buckets",
                         "64x128,64x64,128x64", "--flip", "--crop", "random", "--seed", "5", "--too-small", "skip",
                         "--batch-size", "3", "--json")
    assert code == 0, err
    records = {Path(r["input"]).name: r for r in map(json.loads, out.splitlines())}
    assert records["tiny.png"]["status"] == "skipped" and "20x20 is smaller" in records["tiny.png"]["error"]
    assert "tiny.png: skipped: 20x20" in err
    assert not (tmp_path / "lat" / "tiny.safetensors").exists()
    meta, t = _tensors(tmp_path / "lat" / "wide.safetensors")
    left, top, right, bottom = map(int, meta["crop_box"].split(","))
    assert (right - left, bottom - top, top) == (128, 64, 0) and 0 <= left <= 9
    assert meta["bucket"] == "128x64" and meta["resized"] == "137x64" and meta["target_size"] == "64,128"
    assert meta["original_size"] == "70,150" and meta["crop_top_left"] == f"0,{left}"
    assert meta["crop_top_left_flipped"] == f"0,{137 - right}" and meta["seed"] == "5"
    assert t["latent"].shape == t["latent_flipped"].shape == (4, 32, 64)
    tall, _ = _tensors(tmp_path / "lat" / "tall.safetensors")
    assert tall["bucket"] == "64x128" and tall["original_size"] == "200,64" and tall["target_size"] == "128,64"
    # the same seed crops the same way again; the rerun finds every file done
    code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "lat2", "-w", vae_file, "--buckets",
                         "64x128,64x64,128x64", "--crop", "random", "--seed", "5", "-q")
    assert _tensors(tmp_path / "lat2" / "wide.safetensors")[0]["crop_box"] == meta["crop_box"]
    code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "lat2", "-w", vae_file, "--buckets",
                         "64x128,64x64,128x64", "--crop", "random", "--seed", "5", "--json")
    assert code == 0 and all(json.loads(line)["status"] == "skipped" for line in out.splitlines())
    # other buckets into the same folder: a conflict, not a silent mix
    code, out, err = cli(capsys, "encode", imgs, "-o", tmp_path / "lat2", "-w", vae_file, "--buckets", "sd15", "-q")
    assert code == 1 and "buckets=" in err


@pytest.mark.parametrize("flags,message", [
    (["--flip"], "--crop, --too-small and --flip go with --buckets"),
    (["--buckets", "sd15", "--resize", "512"], "drop --resize"),
    (["--buckets", "sd15", "--crop", "middle"], "--crop 'middle'"),
    (["--buckets", "65x64"], "multiples of the model's factor"),
    (["--seed", "1"], "--seed is for --store sample or --crop random"),
])
def test_bad_bucket_flags(vae_file, tmp_path, capsys, flags, message):
    _photo(64, 64).save(tmp_path / "a.png")
    code, _, err = cli(capsys, "encode", tmp_path / "a.png", "-o", tmp_path / "lat", "-w", vae_file, *flags)
    assert code == 2 and message in err and "Traceback" not in err
