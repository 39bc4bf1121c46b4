"""Architecture inference for every family in models.toml, readable errors, and the offline HF cache lookup."""

import pickle

import pytest
import torch
from conftest import json_lines, make_tiny_vae, save_weights, tiny_config
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

import latentctl
from latentctl.checkpoints import diffusers_to_ldm, infer_config, load_state_dict
from latentctl.errors import WeightsError
from latentctl.modules import AutoencoderKL
from latentctl.registry import load_registry

# Each family's VAE as published: its diffusers config.json (block_out_channels, layers_per_block,
# latent_channels, use_quant_conv, mid_block_add_attention), written out here from the model cards' files,
# independently of models.toml: sd-vae-ft-mse, sdxl-vae, sdxl-vae-fp16-fix and stable-diffusion-3-medium-diffusers/vae,
# FLUX.1's ae (AutoEncoderParams: ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16), CogView4-6B/vae.
PUBLISHED = {
    "sd15": ((128, 256, 512, 512), 2, 4, True, True),
    "sdxl": ((128, 256, 512, 512), 2, 4, True, True),
    "sdxl-fp16-fix": ((128, 256, 512, 512), 2, 4, True, True),
    "sd3": ((128, 256, 512, 512), 2, 16, False, True),
    "flux": ((128, 256, 512, 512), 2, 16, False, True),
    "cogview4": ((128, 512, 1024, 1024), 3, 16, False, False),
}
FAMILIES = list(PUBLISHED)


def diffusers_state_shapes(family: str) -> dict:
    """The key set and shapes diffusers gives this family's published VAE, on the meta device (no memory)."""
    widths, layers, latent, quant, mid_attn = PUBLISHED[family]
    n = len(widths)
    with torch.device("meta"):
        vae = DiffusersVAE(block_out_channels=widths, layers_per_block=layers, latent_channels=latent,
                           down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                           use_quant_conv=quant, use_post_quant_conv=quant, mid_block_add_attention=mid_attn)
    return vae.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_recovers_each_family(family):
    """The architecture read from each published layout is the published one; models.toml's entry agrees with it."""
    widths, layers, latent, quant, mid_attn = PUBLISHED[family]
    sd = diffusers_to_ldm(diffusers_state_shapes(family))
    got = infer_config(sd, family)
    assert tuple(got.ch * m for m in got.ch_mult) == widths and got.num_res_blocks == layers
    assert got.z_channels == got.latent_channels == latent
    assert got.use_quant_conv == got.use_post_quant_conv == quant
    assert got.mid_attn == ("vanilla" if mid_attn else "none")
    # and the network built from the inferred config has exactly that key set and those shapes
    with torch.device("meta"):
        ours = AutoencoderKL(got).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    # models.toml declares the same architecture (it is checked against weights at load)
    declared = load_registry()[family].config()
    assert (declared.ch, declared.ch_mult, declared.num_res_blocks, declared.latent_channels,
            declared.use_quant_conv, declared.mid_attn) == (got.ch, got.ch_mult, got.num_res_blocks,
                                                              got.latent_channels, got.use_quant_conv, got.mid_attn)


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
    r = cli("models", "--json", env={"HF_HOME": str(tmp_path), "HF_HUB_CACHE": ""})
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json_lines(r.stdout)}
    assert rows["sd15"]["weights_found"] is True and rows["sd15"]["weights"] == str(dest)
    assert rows["sdxl"]["weights_found"] is False
    assert rows["sdxl"]["weights"] == "stabilityai/sdxl-vae/diffusion_pytorch_model.safetensors"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=r"sdxl.*not found.*sdxl-vae/diffusion_pytorch_model.safetensors.*models pull sdxl"):
        latentctl.load("sdxl")
