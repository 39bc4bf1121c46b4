"""Quality of the shipped default model on photos it never saw, against the bicubic 8x reference.

    python benchmarks/default_quality.py [--weights PATH | --checkpoint runs/X/ckpt.pt] [--out docs/quality]
                                         [--speed-repeats 9]

Held-out photos: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg (needs
scikit-learn and matplotlib installed; they are used for evaluation only, never for training).
Reference: bicubic downscale by 8 then upscale (3 numbers per 8x8 block; the latent keeps 4).
Artefacts (the default model v2 issue): on each photo every 16x16 corner block's mean absolute error must be
<= 2x the image's median 16x16-block error + 2 levels; eight uniform colours at 256x256 (latentctl.metrics.
FLAT_COLOURS) must come back within 3 levels per channel (mean absolute error) with no frame (border blocks'
error <= 2x the centre's, + 0.5 level so that a near-perfect colour is not failed on rounding).
Speed: encode + decode of a 512x512 image as the commands run it (the model as `latentctl.load` gives it, on
this CPU with torch's default threads), median of --speed-repeats after a warm-up; the aim is <= 1 s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import latentctl
from latentctl.metrics import FLAT_COLOURS, edge_errors
from latentctl.registry import get_entry


def trainer_checkpoint(path: str, attn_window: int):
    """The EMA model of a scripts/train_default.py checkpoint, through the trainer's own loader (it also builds
    experimental layers the library does not load, e.g. --fixed-norm-decoder)."""
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "train_default.py"
    spec = importlib.util.spec_from_file_location("train_default", script)
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    return trainer.load_model(Path(path), "ema", attn_window)[0]


def held_out() -> dict[str, np.ndarray]:
    from matplotlib import cbook
    from sklearn.datasets import load_sample_image

    return {"china": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
            "grace_hopper": np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def bicubic(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


@torch.no_grad()
def reconstruct(vae, img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    f = vae.config.factor
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    ph, pw = (-h) % f, (-w) % f
    x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
    y = vae.decode(vae.encode(x).mean)[:, :, :h, :w]
    return ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def corners_ok(img: np.ndarray, rec: np.ndarray) -> dict:
    """Corner blocks against the image's median block (8-bit levels)."""
    e = edge_errors(torch.from_numpy(np.array(img)).permute(2, 0, 1), torch.from_numpy(rec).permute(2, 0, 1))
    limit = 2 * e["median"] + 2
    return {"corners": [round(c, 1) for c in e["corners"]], "median_block": round(e["median"], 1),
            "corners_ok": all(c <= limit for c in e["corners"])}


@torch.no_grad()
def flat_colours(vae) -> bool:
    """Each of FLAT_COLOURS as a 256x256 image through encode + decode: per-channel mean error and frame."""
    ok = True
    for colour in FLAT_COLOURS:
        img = np.broadcast_to(np.array(colour, dtype=np.uint8), (256, 256, 3)).copy()
        rec = reconstruct(vae, img)
        channel = np.abs(rec.astype(np.float64) - img).mean(axis=(0, 1))
        e = edge_errors(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(rec).permute(2, 0, 1))
        row = {"flat": list(colour), "mean_abs_error_rgb": [round(float(c), 2) for c in channel],
               "border": round(e["border"], 2), "centre": round(e["centre"], 2),
               "ok": bool(channel.max() <= 3 and e["border"] <= 2 * e["centre"] + 0.5)}
        ok &= row["ok"]
        print(json.dumps(row))
    print(f"flat colours: {'PASS' if ok else 'FAIL'} (<= 3 levels per channel, border <= 2x centre + 0.5)")
    return ok


@torch.no_grad()
def speed(vae, img: np.ndarray, repeats: int) -> bool:
    x = torch.from_numpy(np.array(img[:512, :512])).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = torch.nn.functional.pad(x, (0, 512 - x.shape[3], 0, 512 - x.shape[2]), mode="reflect")
    x = x.contiguous(memory_format=torch.channels_last)
    vae.decode(vae.encode(x).mean)                  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        vae.decode(vae.encode(x).mean)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(f"encode + decode 512x512: median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f}; "
          f"{repeats} runs, {torch.get_num_threads()} threads; aim <= 1 s): {'PASS' if med <= 1.0 else 'FAIL'}")
    return med <= 1.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None)
    ap.add_argument("--checkpoint", default=None, help="a scripts/train_default.py checkpoint instead (its EMA)")
    ap.add_argument("--out", default=None, help="folder for side-by-side pictures (original | reconstruction | error)")
    ap.add_argument("--speed-repeats", type=int, default=9, help="timed encode+decode runs at 512x512 (0: skip)")
    args = ap.parse_args()
    if args.checkpoint:   # as the shipped model runs: attention on its models.toml windows
        vae = trainer_checkpoint(args.checkpoint, get_entry("default").config().attn_window)
    else:
        vae, info = latentctl.load("default", weights=args.weights)
    rows, photos = [], held_out()
    for name, img in photos.items():
        t = time.time()
        rec = reconstruct(vae, img)
        row = {"image": name, "size": f"{img.shape[1]}x{img.shape[0]}", "psnr": round(psnr(img, rec), 2),
               "bicubic8": round(psnr(img, bicubic(img, 8)), 2), "bicubic4": round(psnr(img, bicubic(img, 4)), 2),
               "seconds": round(time.time() - t, 2)}
        row["margin"] = round(row["psnr"] - row["bicubic8"], 2)
        row.update(corners_ok(img, rec))
        rows.append(row)
        print(json.dumps(row))
        if args.out:
            err = np.abs(img.astype(np.int16) - rec.astype(np.int16)).mean(axis=2)
            heat = np.clip(err * 4, 0, 255).astype(np.uint8)
            heat = np.stack([heat, heat // 3, 255 - heat], axis=2)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([img, rec, heat], axis=1)).save(Path(args.out) / f"{name}.jpg", quality=90)
    mean_margin = sum(r["margin"] for r in rows) / len(rows)
    ok = all(r["margin"] > 0 for r in rows) and mean_margin >= 3.0
    at_4x = sum(r["psnr"] >= r["bicubic4"] for r in rows)
    print(f"mean margin over bicubic 8x: {mean_margin:+.2f} dB (required: every photo > 0, mean >= +3.0): "
          f"{'PASS' if ok else 'FAIL'}; at or above bicubic 4x on {at_4x} of {len(rows)} (required: 2): "
          f"{'PASS' if at_4x >= 2 else 'FAIL'}")
    corners = all(r["corners_ok"] for r in rows)
    print(f"corner blocks <= 2x median block + 2 levels on every photo: {'PASS' if corners else 'FAIL'}")
    flat = flat_colours(vae)
    ok = ok and at_4x >= 2 and corners and flat
    fast = speed(vae, photos["china"], args.speed_repeats) if args.speed_repeats > 0 else True
    sys.exit(0 if ok and fast else 1)


if __name__ == "__main__":
    main()
