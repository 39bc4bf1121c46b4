"""Architecture inference for every family in models.toml, readable errors, and the offline HF cache lookup."""

import pickle

import pytest
import torch
from conftest import make_tiny_vae, save_weights, tiny_config
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

import latentctl
from latentctl.checkpoints import diffusers_to_ldm, infer_config, load_state_dict
from latentctl.errors import WeightsError
from latentctl.modules import AutoencoderKL
from latentctl.registry import load_registry

FAMILIES = ["sd15", "sdxl", "sdxl-fp16-fix", "sd3", "flux", "cogview4"]


def diffusers_state_shapes(entry) -> dict:
    """The key set and shapes diffusers gives this family's VAE, built on the meta device (full width, no memory)."""
    a = entry.arch
    widths = tuple(a["ch"] * m for m in a["ch_mult"])
    n = len(widths)
    with torch.device("meta"):
        vae = DiffusersVAE(block_out_channels=widths, layers_per_block=a["num_res_blocks"],
                           latent_channels=a["z_channels"], down_block_types=("DownEncoderBlock2D",) * n,
                           up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=a["quant_conv"],
                           use_post_quant_conv=a["quant_conv"], mid_block_add_attention=a["mid_attn"] != "none")
    return vae.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_recovers_each_family(family):
    entry = load_registry()[family]
    sd = diffusers_to_ldm(diffusers_state_shapes(entry))
    got = infer_config(sd, family)
    a = entry.arch
    assert (got.ch, got.ch_mult, got.num_res_blocks) == (a["ch"], tuple(a["ch_mult"]), a["num_res_blocks"])
    assert got.z_channels == got.latent_channels == a["z_channels"]
    assert got.use_quant_conv == got.use_post_quant_conv == a["quant_conv"]
    assert got.mid_attn == a["mid_attn"]
    # and the network built from the inferred config has exactly that key set and those shapes
    with torch.device("meta"):
        ours = AutoencoderKL(got).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_inference_of_the_linear_attention_layout():
    cfg = tiny_config(mid_attn="linear")
    sd = AutoencoderKL(cfg).state_dict()
    assert "encoder.mid.attn_1.to_qkv.weight" in sd
    assert infer_config(sd).mid_attn == "linear"


@pytest.fixture
def tiny_ldm(tmp_path):
    return save_weights(make_tiny_vae(ch_mult=(1, 1, 1, 1)), tmp_path / "tiny.safetensors")


def test_truncated_file_is_a_clear_error(tiny_ldm, tmp_path, cli):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_ldm.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        load_state_dict(bad)
    r = cli("info", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "cut.safetensors" in r.stderr and len(r.stderr.splitlines()) == 1


def test_non_vae_checkpoint_names_the_file_and_keys(tmp_path, cli):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, path)
    r = cli("info", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unet.safetensors" in r.stderr and "not a KL autoencoder" in r.stderr
    assert "model.diffusion_model.input_blocks.0.0.weight" in r.stderr


class Evil:
    def __reduce__(self):  # would run a shell command if the pickle were executed
        import os
        return (os.system, ("touch PWNED",))


def test_pickle_that_needs_code_is_refused_not_run(tmp_path, cli):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    r = cli("info", path, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "evil.ckpt" in r.stderr and "refused" in r.stderr
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(WeightsError, match="refused"):
        load_state_dict(path)


def test_missing_keys_are_named(tiny_ldm, tmp_path):
    from safetensors.torch import load_file
    sd = load_file(tiny_ldm)
    del sd["decoder.up.0.block.0.conv1.weight"]
    save_file(sd, tmp_path / "holes.safetensors")
    with pytest.raises(WeightsError, match=r"holes.safetensors.*missing keys: decoder\.up\.0\.block\.0\.conv1\.weight"):
        latentctl.load_autoencoder(tmp_path / "holes.safetensors")


def fake_hf_cache(root, repo, filename, payload_path, subfolder=""):
    """Lay out a cache folder the way huggingface_hub does: refs/main -> snapshots/REV/..."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    dest = base / "snapshots" / rev / subfolder / filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload_path.read_bytes())
    return dest


def test_hf_cache_lookup_offline(tiny_ldm, tmp_path, monkeypatch, cli):
    cache = tmp_path / "hub"
    dest = fake_hf_cache(cache, "stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors", tiny_ldm)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vae, info = latentctl.load("sd15")
    assert info.weights == str(dest) and vae.config.scaling_factor == 0.18215
    # HF_HOME is honoured too (hub/ below it)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert latentctl.load("sd15")[1].weights == str(dest)
    # and what is missing is said clearly, in one line, with what to do
    r = cli("models", env={"HF_HOME": str(tmp_path)})
    assert r.returncode == 0
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=r"sdxl.*not found.*sdxl-vae/diffusion_pytorch_model.safetensors.*models pull sdxl"):
        latentctl.load("sdxl")
