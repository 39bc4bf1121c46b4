"""latentctl.data: the reader against tensors written here (bit for bit), posterior draws against their
distribution, the bucket sampler's batches (one bucket, every index once, ranks disjoint and identical given the
seed), DataLoader with worker processes, and examples/train_unet.py lowering its loss on a bucketed folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from latentctl import AEConfig, AutoencoderKL
from latentctl.cli.app import main
from latentctl.data import BucketBatchSampler, LatentDataset
from latentctl.errors import InputError
from latentctl.pipeline import latents

ROOT = Path(__file__).resolve().parents[1]
SCALE, SHIFT = 0.5, 0.1


def _write(path: Path, tensors: dict, **meta) -> dict:
    base = {"format": latents.FORMAT, "scaling_factor": repr(SCALE), "shift_factor": repr(SHIFT), "factor": "8"}
    latents.write(path, tensors, {**base, **meta})
    return tensors


@pytest.fixture
def folder(tmp_path):
    """Six files in two buckets (64x64 -> 8x8 latents, 128x64 -> 8x16), with flips; one caption sidecar."""
    g = torch.Generator().manual_seed(0)
    stored = {}
    for i in range(6):
        w = 16 if i % 2 else 8
        t = {"latent": torch.randn(4, 8, w, generator=g).half(), "latent_flipped": torch.randn(4, 8, w, generator=g).half()}
        bucket = f"{w * 8}x64"
        stored[i] = _write(tmp_path / "sub" / f"{i}.safetensors" if i == 5 else tmp_path / f"{i}.safetensors", t,
                           bucket=bucket, original_size="100,200", crop_top_left="3,7", crop_top_left_flipped="3,9",
                           target_size=f"64,{w * 8}")
    (tmp_path / "2.txt").write_text("a cat on a mat\n")
    return tmp_path, stored


def test_reader_yields_the_stored_tensors_and_conditioning(folder):
    root, stored = folder
    data = LatentDataset(root)
    assert len(data) == 6 and data.bucket_keys == ["64x64", "128x64", "64x64", "128x64", "64x64", "128x64"]
    for i in range(6):
        item = data[i]
        assert item["latent"].dtype == torch.float32
        assert torch.equal(item["latent"], stored[i]["latent"].float())  # fp16 -> fp32 is exact
        assert torch.equal(item["latent"].half(), stored[i]["latent"])
        assert item["flipped"] is False
    item = data[2]
    assert item["caption"] == "a cat on a mat" and data[0]["caption"] == ""
    assert item["original_size"].tolist() == [100, 200] and item["crop_top_left"].tolist() == [3, 7]
    assert item["target_size"].tolist() == [64, 64] and item["bucket"] == "64x64"
    assert item["time_ids"].tolist() == [100, 200, 3, 7, 64, 64]
    flipped = LatentDataset(root, flip="always")[1]
    assert flipped["flipped"] is True and torch.equal(flipped["latent"], stored[1]["latent_flipped"].float())
    assert flipped["crop_top_left"].tolist() == [3, 9]


def test_reader_defaults_and_errors(tmp_path):
    _write(tmp_path / "plain.safetensors", {"latent": torch.ones(4, 6, 5)}, width="40", height="48")
    item = LatentDataset(tmp_path)[0]
    assert item["original_size"].tolist() == [48, 40] and item["crop_top_left"].tolist() == [0, 0]
    assert item["target_size"].tolist() == [48, 40] and item["bucket"] == "40x48"
    with pytest.raises(InputError, match="plain.safetensors: no `latent_flipped`"):
        LatentDataset(tmp_path, flip="random")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="bad.safetensors: not a readable safetensors file"):
        LatentDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .safetensors"):
        LatentDataset(tmp_path / "empty")


def test_posterior_samples_have_the_stored_mean_and_variance(tmp_path):
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(4, 16, 16, generator=g)
    logvar = torch.tensor([-4.0, -2.0, 0.0, 1.0]).view(4, 1, 1).expand(4, 16, 16).contiguous()
    _write(tmp_path / "p.safetensors", {"latent": (mean - SHIFT) * SCALE, "mean": mean, "logvar": logvar})
    data = LatentDataset(tmp_path, seed=3)
    draws = []
    for epoch in range(200):
        data.set_epoch(epoch)
        draws.append(data[0]["latent"])
    draws = torch.stack(draws)
    z = draws / SCALE + SHIFT                                          # back to raw latents
    r = (z - mean) / torch.exp(0.5 * logvar)                             # standardised: N(0, 1) if right
    assert abs(r.mean().item()) < 0.02 and abs(r.var().item() - 1) < 0.03
    per_channel_std = (z - mean).flatten(2).std(dim=(0, 2))
    torch.testing.assert_close(per_channel_std, torch.exp(0.5 * logvar[:, 0, 0]), rtol=0.03, atol=0)
    data.set_epoch(5)
    assert torch.equal(data[0]["latent"], draws[5])                      # reproducible from (seed, epoch, index)
    assert not torch.equal(draws[0], draws[1])
    stored = LatentDataset(tmp_path, sample_posterior=False)[0]["latent"]
    assert torch.equal(stored, (mean - SHIFT) * SCALE)


def test_flipped_posterior_draws_from_the_flipped_moments(tmp_path):
    mean, mean_f = torch.zeros(4, 4, 4), torch.full((4, 4, 4), 3.0)
    tiny = torch.full((4, 4, 4), -30.0)  # std 3e-7: the draw is the mean
    _write(tmp_path / "p.safetensors", {"latent": mean.clone(), "mean": mean, "logvar": tiny.clone(),
                                        "latent_flipped": mean_f.clone(), "mean_flipped": mean_f, "logvar_flipped": tiny})
    item = LatentDataset(tmp_path, flip="always", seed=0)[0]
    torch.testing.assert_close(item["latent"], (mean_f - SHIFT) * SCALE)
    _write(tmp_path / "p.safetensors", {"latent": mean.clone(), "mean": mean, "logvar": tiny.clone()}, scaled="false")
    torch.testing.assert_close(LatentDataset(tmp_path, seed=0)[0]["latent"], mean)  # raw latents stay raw


def test_random_flip_is_a_fair_reproducible_coin(folder):
    root, stored = folder
    data = LatentDataset(root, flip="random", seed=0)
    seen = []
    for epoch in range(50):
        data.set_epoch(epoch)
        seen.append([data[i]["flipped"] for i in range(6)])
    frac = np.mean(seen)
    assert 0.38 < frac < 0.62  # 300 draws: 0.5 +- 4 standard deviations
    data.set_epoch(7)
    assert [data[i]["flipped"] for i in range(6)] == seen[7]
    item = data[0]
    assert torch.equal(item["latent"], stored[0]["latent_flipped" if item["flipped"] else "latent"].float())


KEYS = ["a"] * 7 + ["b"] * 5 + ["c"] * 12   # 24 items in three buckets


def test_sampler_batches_hold_one_bucket_and_cover_the_epoch():
    s = BucketBatchSampler(KEYS, batch_size=4, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 2 + 2 + 3
    assert all(len({KEYS[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(24))
    s.set_epoch(1)
    assert list(s) != batches and sorted(i for b in s for i in b) == list(range(24))
    dropped = BucketBatchSampler(KEYS, batch_size=4, seed=0, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 1 + 1 + 3 and all(len(b) == 4 for b in dropped)
    ordered = list(BucketBatchSampler(KEYS, batch_size=4, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3] and ordered == list(BucketBatchSampler(KEYS, batch_size=4, shuffle=False))


def test_sampler_ranks_agree_split_and_are_disjoint():
    keys = ["a"] * 8 + ["b"] * 8 + ["c"] * 16   # 8 batches of 4: divisible by 2
    ranks = [BucketBatchSampler(keys, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches() == ranks[1].batches()                   # every rank computes the same list
    got = [list(r) for r in ranks]
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == 4
    flat = [set(i for b in g for i in b) for g in got]
    assert not flat[0] & flat[1] and flat[0] | flat[1] == set(range(32))
    again = [list(BucketBatchSampler(keys, batch_size=4, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert again == got
    # 7 batches over 2 ranks: filled up to 8 by repeating the first (drop_last=False), or cut to 6
    uneven = [list(BucketBatchSampler(KEYS, batch_size=4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 4
    assert set(i for g in uneven for b in g for i in b) == set(range(24))
    cut = [BucketBatchSampler(KEYS, batch_size=4, seed=0, drop_last=True, rank=r, world_size=2) for r in range(2)]
    assert len(list(cut[0])) == len(list(cut[1])) == len(cut[0]) == 2


def test_dataloader_with_two_workers(folder):
    root, stored = folder
    data = LatentDataset(root, flip="random", seed=1)
    sampler = BucketBatchSampler(data, batch_size=3, seed=1)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["latent"].shape[0] == 3 and len(set(batch["bucket"])) == 1
        for k, i in enumerate(batch["index"].tolist()):
            key = "latent_flipped" if batch["flipped"][k] else "latent"
            assert torch.equal(batch["latent"][k], stored[i][key].float())
        assert batch["time_ids"].shape == (3, 6)
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(6))
    # the workers' draws are the ones the main process makes from (seed, epoch, index)
    assert [bool(f) for b in batches for f in b["flipped"]] == [data[i]["flipped"] for b in batches
                                                                 for i in b["index"].tolist()]


@pytest.mark.slow
def test_train_unet_example_lowers_the_loss(tmp_path, capsys):
    """encode a bucketed folder with a small factor-8 VAE, then 50 steps of examples/train_unet.py."""
    from skimage import data as sk
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    (tmp_path / "config.json").write_text('{"scaling_factor": 1.0, "shift_factor": 0.0}')  # raw latents, said so
    sizes = [(90, 60), (60, 90), (70, 70), (140, 64), (64, 140), (80, 66)]
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "camera", "rocket", "cat"]):
        Image.fromarray(getattr(sk, name)()).convert("RGB").resize(sizes[i % 6]).save(tmp_path / f"{i}.png")
    with pytest.raises(SystemExit) as exit_:
        main(["encode", str(tmp_path), "-o", str(tmp_path / "lat"), "-w", str(tmp_path / "vae.safetensors"),
              "--buckets", "64x64,128x64,64x128", "--flip", "--store", "posterior", "-q"])
    assert exit_.value.code == 0, capsys.readouterr().err
    assert set(LatentDataset(tmp_path / "lat").bucket_keys) == {"64x64", "128x64", "64x128"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_unet.py"), str(tmp_path / "lat"),
                           "--steps", "50", "--threads", "1", "--json"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses) == 50 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_reader_reads_tar_shards_written_by_webdataset(folder, tmp_path_factory):
    """The shard layout (KEY.latent.safetensors + KEY.txt), written by the webdataset package itself."""
    import webdataset as wds
    root, stored = folder
    shards = tmp_path_factory.mktemp("shards")
    files = LatentDataset(root)
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for i in range(6):
            sample = {"__key__": f"sample{i:03d}", "latent.safetensors": Path(files.paths[i]).read_bytes()}
            if i == 2:
                sample["txt"] = "a cat on a mat"
            sink.write(sample)
    data = LatentDataset(shards, flip="always")
    assert len(data) == 6 and data.bucket_keys == files.bucket_keys
    for i in range(6):
        item, ref = data[i], LatentDataset(root, flip="always")[i]
        assert item["path"].endswith(f"00000.tar:sample{i:03d}")
        assert torch.equal(item["latent"], stored[i]["latent_flipped"].float())
        assert torch.equal(item["time_ids"], ref["time_ids"]) and item["bucket"] == ref["bucket"]
    assert data[2]["caption"] == "a cat on a mat" and data[0]["caption"] == ""
    batches = list(DataLoader(data, batch_sampler=BucketBatchSampler(data, batch_size=3, seed=0), num_workers=2))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(6))
    (shards / "broken.tar").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="broken.tar"):
        LatentDataset(shards)


def test_reader_reads_encode_to_wds_as_encode_to_files(tmp_path, capsys):
    """`encode --to wds --buckets --flip` and the same run to files: the reader yields the same items."""
    from skimage import data as sk
    for i, (name, size) in enumerate([("astronaut", (90, 60)), ("coffee", (60, 90)), ("chelsea", (70, 70))]):
        Image.fromarray(getattr(sk, name)()).convert("RGB").resize(size).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    torch.manual_seed(0)
    save_file(AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict(), tmp_path / "v.safetensors")
    common = ["encode", str(tmp_path), "-w", str(tmp_path / "v.safetensors"), "--scaling-factor", "1", "--buckets",
              "64x64,128x64,64x128", "--flip", "--latent-dtype", "fp32", "-q"]
    for out, extra in (("files", []), ("wds", ["--to", "wds"])):
        with pytest.raises(SystemExit) as exit_:
            main(common + ["-o", str(tmp_path / "out" / out), *extra])
        assert exit_.value.code == 0, capsys.readouterr().err
    assert list((tmp_path / "out" / "wds").glob("*.tar"))
    files = LatentDataset(tmp_path / "out" / "files", flip="always")
    shards = LatentDataset(tmp_path / "out" / "wds", flip="always")
    assert len(files) == len(shards) == 3 and sorted(files.bucket_keys) == sorted(shards.bucket_keys)
    by_key = {shards[i]["path"].rsplit(":", 1)[1]: shards[i] for i in range(3)}
    for i in range(3):
        a = files[i]
        b = by_key[Path(a["path"]).stem]
        assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["time_ids"], b["time_ids"])
        assert a["caption"] == b["caption"] == f"caption {Path(a['path']).stem}"  # beside the source image
