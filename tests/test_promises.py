"""README promises no other test exercised, each against something outside the code path it checks: the weights'
hash at load, an overflowing latent refused, fsync before the rename, the user's models.toml, SGM `vae.` keys,
and `--max-memory` holding in a real process's memory."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import json_lines, make_tiny_vae, run_cli, run_main, save_weights
from PIL import Image
from safetensors.torch import save_file

import latentctl
from latentctl.errors import WeightsError
from latentctl.pipeline import latents

TESTS = Path(__file__).parent


@pytest.fixture
def photo(tmp_path):
    from skimage import data

    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.fromarray(data.astronaut()).resize((40, 32)).save(path)
    return path


def _models_toml(path: Path, weights: Path, sha256: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        [mine]
        path = "{weights}"
        sha256 = "{sha256}"
        ch = 32
        ch_mult = [1, 2]
        num_res_blocks = 1
        z_channels = 4
        scaling_factor = 0.5
        shift_factor = 0.0
    """))
    return path


# --- the sha256 of models.toml is checked at load --------------------------------------------------------------

def test_weights_whose_sha256_differs_from_models_toml_are_refused(tmp_path, photo, capsys):
    weights = save_weights(make_tiny_vae(), tmp_path / "w" / "vae.safetensors")
    good = hashlib.sha256(weights.read_bytes()).hexdigest()     # hashlib here, not the code's sha256_file
    ok = _models_toml(tmp_path / "ok.toml", weights, good)
    vae, info = latentctl.load("mine", models_file=ok)
    assert info.weights_sha256 == good
    bad = _models_toml(tmp_path / "bad.toml", weights, "0" * 64)
    with pytest.raises(WeightsError, match=r"sha256 .* does not match models.toml's 000000000000"):
        latentctl.load("mine", models_file=bad)
    code, _, err = run_main(capsys, "encode", photo, "-o", tmp_path / "out", "--models", bad, "-m", "mine")
    assert code == 2 and "does not match" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    # the shipped default's recorded hash is the file's
    from latentctl.registry import get_entry
    entry = get_entry("default")
    assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == entry.sha256


# --- a latent that would overflow fp16 is refused, never written as inf ----------------------------------------

def test_latent_that_overflows_fp16_is_refused_not_written_as_inf(tmp_path, photo, capsys):
    vae = make_tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[:4] += 1e5          # posterior means near 1e5: over fp16's largest value, 65504
    weights = save_weights(vae, tmp_path / "w" / "vae.safetensors", scaling_factor=1.0)
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, "encode", photo, "-o", out, "-w", weights, "--json")
    (record,) = json_lines(stdout)
    assert code == 1 and record["status"] == "error", err
    assert "overflow" in record["error"] and "--latent-dtype" in record["error"]
    assert not list(out.rglob("*.safetensors")) and not [p for p in out.rglob("*") if p.is_file()
                                                        and ".latentctl-progress" not in p.parts]  # status records
    # the same image in fp32 storage: written, finite, and the values fp16 could not hold
    code, _, err = run_main(capsys, "encode", photo, "-o", out, "-w", weights, "--latent-dtype", "fp32", "-q")
    assert code == 0, err
    latent, _ = latents.read(out / "photo.safetensors")
    assert torch.isfinite(latent).all() and latent.abs().max() > torch.finfo(torch.float16).max


# --- every file is fsynced before it is renamed into place -----------------------------------------------------

def test_atomic_write_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "x.safetensors"
    latents.atomic_write(target, b"0123456789" * 100)
    (synced,) = [e for e in events if e[0] == "fsync"]
    (renamed,) = [e for e in events if e[0] == "replace"]
    assert events.index(synced) < events.index(renamed)
    assert synced[1] == renamed[1] and synced[2] == 1000       # the temporary file, complete, is what was synced
    assert renamed[2] == str(target) and Path(renamed[1]).parent == target.parent   # same folder: atomic rename
    assert target.read_bytes() == b"0123456789" * 100


# --- the user's ~/.config/latentctl/models.toml adds and overrides entries ------------------------------------

def test_user_models_toml_in_home_config_adds_and_overrides(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    weights = save_weights(make_tiny_vae(), home / "weights" / "vae.safetensors")
    user = home / ".config" / "latentctl" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text(textwrap.dedent("""
        [mine]
        path = "../../weights/vae.safetensors"     # relative to this file
        ch = 32
        ch_mult = [1, 2]
        num_res_blocks = 1
        scaling_factor = 0.25
        [sd15]
        scaling_factor = 0.5                       # overrides one key of the shipped entry
    """))
    monkeypatch.setenv("HOME", str(home))             # ~ is $HOME (Path.home())
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    code, out, err = run_main(capsys, "models", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json_lines(out)}
    assert rows["mine"]["weights_found"] and rows["mine"]["weights"] == str(weights)
    assert rows["mine"]["scaling_factor"] == 0.25
    assert rows["sd15"]["scaling_factor"] == 0.5 and rows["sd15"]["channels"] == 4   # the rest kept
    assert rows["default"]["scaling_factor"] == 0.35974
    vae, info = latentctl.load("mine")
    assert info.weights == str(weights) and vae.config.scaling_factor == 0.25
    # a fresh process finds it the same way; without that file, neither entry is there
    r = run_cli("models", "--json", env={"HOME": str(home), "XDG_CONFIG_HOME": ""})
    assert r.returncode == 0 and {row["name"]: row for row in json_lines(r.stdout)}["mine"]["scaling_factor"] == 0.25
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    rows = {row["name"]: row for row in json_lines(run_main(capsys, "models", "--json")[1])}
    assert "mine" not in rows and rows["sd15"]["scaling_factor"] == 0.18215


# --- SGM checkpoints: the VAE under `vae.`, beside other networks ----------------------------------------------

@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_full_checkpoint_with_a_prefixed_vae_loads_that_vae(tmp_path, prefix):
    ref = make_tiny_vae(seed=3, jitter=0.05)
    sd = {prefix + k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)   # the rest of the checkpoint
    sd["conditioner.embedders.0.transformer.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "full.safetensors")
    vae = latentctl.load_autoencoder(tmp_path / "full.safetensors")
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).mean, ref.encode(x).mean)
        assert torch.equal(vae.decode(ref.encode(x).mean), ref.decode(ref.encode(x).mean))


# --- --max-memory holds in real memory ---------------------------------------------------------------------------

MEASURE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import run_main_argv

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

small, big, out, weights, *extra = sys.argv[1:]
run_main_argv(["encode", small, "-o", out + "-warm", "-w", weights, "-q", *extra])   # imports, kernels, model
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # peak RSS (VmHWM) := current RSS
code = run_main_argv(["encode", big, "-o", out, "-w", weights, "-q", *extra])
print(code, status("VmHWM") - base)
"""


@pytest.mark.slow
def test_max_memory_holds_in_a_real_process(tmp_path):
    """Peak RSS growth of a real encode of a 512x512 photo (factor-8 tiny model, in a fresh process after a warm-up
    run): under --max-memory 24M within the budget plus 64 MiB, untiled over twice that. --max-memory bounds the
    activations (tiling's budget); the pipeline's own buffers (the decoded image in uint8 and float, the batch,
    the latent) and the allocator come on top: measured 82 MiB growth at 640x640 for 24M, 236 MiB untiled."""
    from skimage import data

    weights = save_weights(make_tiny_vae(jitter=0.05, ch_mult=(1, 2, 2, 2)), tmp_path / "w" / "vae.safetensors",
                           scaling_factor=1.0)
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    photo = Image.fromarray(data.astronaut())
    photo.resize((64, 64)).save(small)
    photo.resize((512, 512)).save(big)
    from latentctl import tiling
    p = tiling.plan(latentctl.load(weights=weights)[0], (1, 3, 512, 512), "encode", mode="auto", budget=24 * 2**20)
    assert p.tile and p.fits and p.peak <= 24 * 2**20 < p.estimate   # the planner says it fits, untiled would not
    script = MEASURE.format(tests=str(TESTS))
    growth = {}
    # fp32 in both (auto would be bf16 on a CPU with bf16 kernels: half the activations, and the plan is fp32's)
    for name, extra in (("budget", ["--max-memory", "24M", "--dtype", "fp32"]),
                        ("untiled", ["--tile", "off", "--dtype", "fp32"])):
        r = subprocess.run([sys.executable, "-c", script, small, big, str(tmp_path / name), str(weights), *extra],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and r.stdout.split()[0] == "0", r.stderr
        growth[name] = int(r.stdout.split()[1])
    mib = {k: round(v / 2**20, 1) for k, v in growth.items()}
    assert growth["budget"] <= 24 * 2**20 + 64 * 2**20, mib
    assert growth["untiled"] > 2 * growth["budget"], mib          # the budget is what kept it down
    a, b = (latents.read(tmp_path / name / "big.safetensors")[0] for name in ("budget", "untiled"))
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
