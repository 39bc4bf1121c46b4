"""The shipped default model does its job: it loads (hash checked) and beats the bicubic reference on a held-out photo."""

import json

import numpy as np
from PIL import Image

import latentctl
from latentctl.registry import get_entry, sha256_file


def bicubic_psnr(img: np.ndarray, factor: int = 8) -> float:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BICUBIC)
    back = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((img.astype(np.float64) - back) ** 2)))


def test_default_model_is_shipped_with_its_hash():
    entry = get_entry("default")
    assert entry.path.is_file() and entry.path.stat().st_size <= 10_000_000
    assert sha256_file(entry.path) == entry.sha256
    vae, info = latentctl.load()
    c = vae.config
    assert (c.factor, c.latent_channels, c.mid_attn, c.attn_window) == (8, 4, "vanilla", 32)
    assert info.name == "default" and info.weights_sha256 == entry.sha256


def test_roundtrip_of_a_held_out_photo_beats_bicubic(tmp_path, cli):
    """scikit-learn's china.jpg is never used in training; the latent keeps 4 numbers per 8x8 block, bicubic 3."""
    from sklearn.datasets import load_sample_image  # test extra: the held-out photo

    img = load_sample_image("china.jpg")
    Image.fromarray(img).save(tmp_path / "china.png")
    r = cli("roundtrip", tmp_path / "china.png", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    reference = bicubic_psnr(img)
    assert row["psnr"] > reference, (row, reference)
