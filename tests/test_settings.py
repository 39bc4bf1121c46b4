"""Where a model's settings come from (issue 14): explicit flags > the named model's entry > the weights' own
config.json > a published file recognised by its sha256 > refuse. Checked against diffusers, which applies a
folder's config.json the same way."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_main

import latentctl
from latentctl.errors import UsageError
from latentctl.modules import AEConfig, AttnBlock, AutoencoderKL
from latentctl.pipeline import Options, encode_files, plan_encode

LAYOUTS = {
    # SD 1.x layout at reduced width (diffusers' AutoencoderKL default scale 0.18215, no shift)
    "sd": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, scaling_factor=0.18215),
    # SD3/FLUX layout: 16 channels, no quant convs, a scale and a shift (FLUX's)
    "flux": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16, use_quant_conv=False,
                 use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
}


def make_diffusers(layout: str) -> DiffusersVAE:
    torch.manual_seed(0)
    kw = LAYOUTS[layout]
    n = len(kw["block_out_channels"])
    vae = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw)
    with torch.no_grad():  # move norms and biases off their init values so every parameter matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


cli = run_main  # the CLI in this process: (exit code, stdout, stderr)


def tiny_weights(path: Path, seed: int = 0, **config) -> Path:
    """Random weights of a small factor-2 VAE in the original layout, with no config.json beside them."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(AEConfig(**{"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, **config}))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), path)
    return path


def photo(path: Path, size=(24, 20), seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --- load(weights=...) never borrows the default model's settings -------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("form", ["folder", "file"])
def test_load_weights_alone_equals_diffusers_with_the_files_config(layout, form, tmp_path):
    ref = make_diffusers(layout)
    ref.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" if form == "folder" else tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae, info = latentctl.load(weights=weights)
    assert info.settings == "config.json"
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (ref.config.scaling_factor,
                                                                    ref.config.shift_factor or 0.0)
    # whole-image attention, not the default model's 32-latent-pixel window
    assert vae.config.attn_window == 0 and all(m.window == 0 for m in vae.modules() if isinstance(m, AttnBlock))
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shift = ref.config.shift_factor or 0.0
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - shift) * ref.config.scaling_factor   # model-ready, diffusers' way
        got = vae.normalize(vae.encode(x).mean)
        assert (got - want).abs().max() <= 1e-4
        want_image = ref.decode(want / ref.config.scaling_factor + shift).sample
        got_image = vae.decode(vae.denormalize(want))
        assert (got_image - want_image).abs().max() <= 1e-4


def test_flags_beat_the_config_and_the_named_entry_beats_the_file(tmp_path):
    ref = make_diffusers("flux")
    ref.save_pretrained(tmp_path / "vae")
    vae, info = latentctl.load(weights=tmp_path / "vae", scaling_factor=2.0)
    assert (vae.config.scaling_factor, vae.config.shift_factor, info.settings) == (2.0, 0.1159, "flags")
    toml = tmp_path / "models.toml"
    toml.write_text('[mine]\nscaling_factor = 0.25\nshift_factor = 0.5\nz_channels = 16\nattn_window = 8\n')
    vae, info = latentctl.load("mine", weights=tmp_path / "vae", models_file=toml)
    assert (vae.config.scaling_factor, vae.config.shift_factor, info.settings) == (0.25, 0.5, "model mine")
    assert vae.config.attn_window == 8 and info.name == "mine"


def test_weights_nobody_describes_load_raw_and_are_not_encoded(tmp_path):
    weights = tiny_weights(tmp_path / "w" / "vae.safetensors")
    vae, info = latentctl.load(weights=weights)
    assert info.settings == "unknown" and info.name == "vae"
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.attn_window) == (1.0, 0.0, 0)
    items = plan_encode([str(photo(tmp_path / "in" / "a.png"))], tmp_path / "out")
    with pytest.raises(UsageError, match="no latent scale known"):
        encode_files(vae, info, items, Options())
    assert not (tmp_path / "out").exists()


# --- known public files, recognised by sha256 ----------------------------------------------------------------

def test_a_known_files_sha256_gives_its_published_scale(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "w" / "published.safetensors")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    toml = tmp_path / "models.toml"
    toml.write_text(f'[published]\nscaling_factor = 0.7\nshift_factor = 0.2\nz_channels = 4\nch_mult = [1, 2]\n'
                    f'known_sha256 = ["{sha}"]\n')
    vae, info = latentctl.load(weights=weights, models_file=toml)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.7, 0.2)
    assert (info.name, info.settings) == ("published", "sha256 (published)")
    # another file of the same shape is not that model
    other = tiny_weights(tmp_path / "w" / "other.safetensors", seed=1)
    assert latentctl.load(weights=other, models_file=toml)[1].settings == "unknown"
    # and the CLI writes the published scale into the latents
    code, _, err = cli(capsys, "encode", photo(tmp_path / "in" / "a.png"), "-o", tmp_path / "out", "-w", weights,
                       "--models", toml, "-q")
    assert code == 0, err
    meta = metadata(tmp_path / "out" / "a.safetensors")
    assert (meta["scaling_factor"], meta["shift_factor"], meta["model"]) == ("0.7", "0.2", "published")


def test_shipped_hashes_are_well_formed_and_unique():
    from latentctl.registry import load_registry
    seen = {}
    for entry in load_registry().values():
        for h in entry.known_sha256:
            assert len(h) == 64 and int(h, 16) >= 0 and h == h.lower()
            assert h not in seen, f"{h} listed for both {seen[h]} and {entry.name}"
            seen[h] = entry.name
    assert {"sd15", "sdxl", "sdxl-fp16-fix", "sd3", "flux"} <= set(seen.values())


# --- the CLI refuses what it cannot scale ----------------------------------------------------------------------

def test_encode_of_an_unknown_single_file_is_refused_before_any_work(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "w" / "vae.safetensors")
    image = photo(tmp_path / "in" / "a.png")
    code, out, err = cli(capsys, "encode", image, "-o", tmp_path / "out", "-w", weights)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "--model" in err and "--scaling-factor" in err and "--shift-factor" in err and "vae.safetensors" in err
    assert not (tmp_path / "out").exists()
    # the refusal comes first, even with inputs that do not exist
    code, _, err = cli(capsys, "encode", tmp_path / "nothing-here", "-o", tmp_path / "out", "-w", weights)
    assert code == 2 and "--scaling-factor" in err
    # a stated scale is what gets written
    code, _, err = cli(capsys, "encode", image, "-o", tmp_path / "out", "-w", weights, "--scaling-factor", "0.5", "-q")
    assert code == 0, err
    meta = metadata(tmp_path / "out" / "a.safetensors")
    assert (float(meta["scaling_factor"]), float(meta["shift_factor"]), meta["scaled"]) == (0.5, 0.0, "true")
    for bad in ("0", "-1", "nan", "inf"):
        code, _, err = cli(capsys, "encode", image, "-o", tmp_path / "o2", "-w", weights, "--scaling-factor", bad)
        assert code == 2 and "--scaling-factor" in err


# --- decode: the model each file records, per file ---------------------------------------------------------------

def _pixels(path: Path):
    import numpy as np
    return np.asarray(Image.open(path).convert("RGB"))


def test_decode_finds_the_recorded_weights_when_the_named_model_has_none_here(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    weights = tiny_weights(tmp_path / "w" / "vae.safetensors")
    toml = tmp_path / "models.toml"   # like `--model sd3 --weights X`: the entry's own weights are not here
    toml.write_text('[mine]\nrepo = "nobody/nothing"\nscaling_factor = 0.6\nshift_factor = 0.1\nch_mult = [1, 2]\n')
    code, _, err = cli(capsys, "encode", photo(tmp_path / "in" / "a.png"), "-o", tmp_path / "lat", "-m", "mine",
                       "-w", weights, "--models", toml, "-q")
    assert code == 0, err
    for extra in (["--models", toml], []):   # with or without the entry at decode time
        out = tmp_path / f"dec{len(extra)}"
        code, _, err = cli(capsys, "decode", tmp_path / "lat", "-o", out, *extra)
        assert code == 0, err
        assert Image.open(out / "a.png").size == (24, 20)
    assert (_pixels(tmp_path / "dec0" / "a.png") == _pixels(tmp_path / "dec2" / "a.png")).all()
    # moved weights: --weights is used for files whose recorded weights are gone, if it is the same file
    moved = tmp_path / "elsewhere" / "vae.safetensors"
    moved.parent.mkdir()
    weights.rename(moved)
    code, _, err = cli(capsys, "decode", tmp_path / "lat", "-o", tmp_path / "gone")
    assert code == 1 and "not on this machine" in err and "--weights" in err
    code, _, err = cli(capsys, "decode", tmp_path / "lat", "-o", tmp_path / "moved", "-w", moved)
    assert code == 0, err
    assert (_pixels(tmp_path / "moved" / "a.png") == _pixels(tmp_path / "dec0" / "a.png")).all()
    other = tiny_weights(tmp_path / "other" / "vae.safetensors", seed=5)
    code, _, err = cli(capsys, "decode", tmp_path / "lat", "-o", tmp_path / "other-out", "-w", other)
    assert code == 1 and "other weights" in err


def test_a_mixed_model_folder_decodes_grouped_and_an_unknown_model_costs_only_its_file(tmp_path, capsys,
                                                                                       monkeypatch):
    from latentctl import api
    from latentctl.pipeline import decode_files, plan_decode

    a = tiny_weights(tmp_path / "a" / "vae.safetensors", seed=0)
    b = tiny_weights(tmp_path / "b" / "vae.safetensors", seed=1, z_channels=8, embed_dim=8)  # 8 latent channels
    gone = tiny_weights(tmp_path / "gone" / "vae.safetensors", seed=2)
    lat = tmp_path / "lat"
    for weights, folder, n in ((a, "by-a", 3), (b, "by-b", 2), (gone, "0-first", 1)):
        imgs = [photo(tmp_path / "in" / folder / f"{i}.png", size=(20 + 2 * i, 16), seed=i) for i in range(n)]
        code, _, err = cli(capsys, "encode", *imgs, "-o", lat / folder, "-w", weights, "--scaling-factor", "0.5", "-q")
        assert code == 0, err
    gone.unlink()   # the alphabetically first file's model is now unknown here
    loads = []
    real_load = api.load
    monkeypatch.setattr(api, "load", lambda *a, **k: loads.append((a, k.get("weights"))) or real_load(*a, **k))
    code, out, err = cli(capsys, "decode", lat, "-o", tmp_path / "dec", "--json")
    assert code == 1
    records = {Path(r["input"]).relative_to(lat).as_posix(): r for r in map(json.loads, out.splitlines())}
    assert records["0-first/0.safetensors"]["status"] == "error"
    assert "not on this machine" in records["0-first/0.safetensors"]["error"]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == \
        [f"error: {lat / '0-first/0.safetensors'}: {records['0-first/0.safetensors']['error']}"]
    assert {k: r["status"] for k, r in records.items() if not k.startswith("0-")} == \
        {f"by-a/{i}.safetensors": "ok" for i in range(3)} | {f"by-b/{i}.safetensors": "ok" for i in range(2)}
    assert sorted(str(w) for _, w in loads) == sorted([str(a), str(b)])   # each model loaded once
    # each file decoded exactly as with its own model alone, at the precision the command chose (auto: bf16 on a
    # CPU with bf16 kernels, whose rounding differs from fp32's by more than a level)
    dtype = api.resolve_dtype("auto", torch.device("cpu"))
    for weights, folder in ((a, "by-a"), (b, "by-b")):
        vae, info = real_load(weights=weights, dtype=dtype)
        decode_files(vae, info, plan_decode([str(lat / folder)], tmp_path / "ref" / folder), Options(dtype=dtype))
        for png in (tmp_path / "ref" / folder).glob("*.png"):
            assert (_pixels(png) == _pixels(tmp_path / "dec" / folder / png.name)).all(), png


# --- a CLI that fits the shell ----------------------------------------------------------------------------------

def test_shell_completion_is_on(tmp_path):
    from conftest import run_cli
    r = run_cli("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0, r.stderr
    assert "_LATENTCTL_COMPLETE" in r.stdout and "complete" in r.stdout and "latentctl" in r.stdout
    # and the completion itself answers: `latentctl enc<TAB>`
    r = run_cli(env={"_LATENTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "latentctl enc", "COMP_CWORD": "1"})
    assert "encode" in r.stdout.split(), (r.stdout, r.stderr)


COMMANDS = [[], ["encode"], ["decode"], ["roundtrip"], ["bench"], ["models"], ["models", "pull"], ["info"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "latentctl")
def test_help_reads_like_a_normal_cli(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0
    assert "<bool>" not in out and "<list[str]>" not in out and "{inputs}" not in out and "{file}" not in out
    if command in (["encode"], ["decode"], ["roundtrip"]):
        assert f"Usage: latentctl {command[0]} [OPTIONS] INPUTS..." in out
        assert "--json " in out and "--scaling-factor" in out if command != ["roundtrip"] else True
    if command == ["info"]:
        assert "Usage: latentctl info [OPTIONS] FILE" in out


def test_piped_tables_keep_every_path_and_hash_whole(tmp_path, capsys):
    weights = tiny_weights(tmp_path / ("a-rather-long-folder-name-" * 4) / "vae.safetensors")
    code, _, err = cli(capsys, "encode", photo(tmp_path / "in" / "a.png"), "-o", tmp_path / "out", "-w", weights,
                       "--scaling-factor", "0.5", "-q")
    assert code == 0, err
    latent = tmp_path / "out" / "a.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    code, out, _ = cli(capsys, "info", latent)   # stdout is not a terminal here: tab-separated rows
    assert code == 0 and "…" not in out
    rows = dict(line.split("\t", 1) for line in out.splitlines())
    assert rows["metadata.weights_sha256"] == sha and rows["metadata.weights"] == str(weights)
    toml = tmp_path / "m.toml"
    toml.write_text(f'[long]\npath = "{weights}"\nscaling_factor = 0.5\nch_mult = [1, 2]\n')
    code, out, _ = cli(capsys, "models", "--models", toml)
    lines = out.splitlines()
    assert lines[0].split("\t") == ["name", "channels", "factor", "scale", "shift", "found", "weights"]
    assert f"long\t4\t2x\t0.5\t0.0\tyes\t{weights}" in lines
    code, out, _ = cli(capsys, "roundtrip", tmp_path / "in", "-w", weights)
    assert code == 0 and out.splitlines()[0] == "input\tpsnr (dB)\tssim\tseconds"
    assert out.splitlines()[1].startswith(str(tmp_path / "in" / "a.png") + "\t")
