"""Tiled encode/decode against untiled, beside diffusers' enable_tiling(): seams, memory, cost.

    python benchmarks/tiling.py                  # photos (longest side 512) + cost at 1024x1024   (~25 min, 1 core)
    python benchmarks/tiling.py --photos-full    # the photos at their own sizes (retina is 1411x1411)
    python benchmarks/tiling.py --mosaics        # 1024x1024 and 2048x2048 mosaics of the photos (2048: ~21 GB RAM)
    python benchmarks/tiling.py --memory         # peak RSS, fresh process each: 2048x2048 decode vs diffusers tiled,
                                                 # 4096x4096 encode and decode (hours on one core: --memory-runs)
    python benchmarks/tiling.py --large 2048 4096 --device cuda   # tiled vs untiled where untiled fits (big GPU)

Models: SD-VAE architecture (ch 128, mults 1,2,4,4, 2 res blocks) initialised by diffusers (random weights,
seed 0) and loaded into latentctl with checkpoints.diffusers_to_ldm, so both libraries run the same weights;
and the shipped default model (latentctl.load("default")) when its weights are there. diffusers' tiling runs
with the same tile size as ours (tile_sample_min_size, overlap 0.25). Images: scikit-image's astronaut,
retina and hubble_deep_field. Tiled latents are compared as posterior means, decodes from the untiled latent.
Every target is printed with its measured value and the command that reproduces it.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentctl import tiling
from latentctl.checkpoints import build_from_state_dict, diffusers_to_ldm, load_autoencoder

SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
GB = 1e9
MEMORY_RUNS = ["diffusers2048", "decode2048", "encode4096", "decode4096"]
HERE = Path(__file__).resolve()
RESULTS: list[dict] = []


# --- models and images -------------------------------------------------------------------------------------------

def diffusers_vae(block_out_channels, layers_per_block, latent_channels, seed=0):
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                        latent_channels=latent_channels, sample_size=512).eval().requires_grad_(False)


def sd_pair():
    """(ours, diffusers) with the same diffusers-initialised SD-architecture weights."""
    ref = diffusers_vae(**SD)
    return build_from_state_dict(diffusers_to_ldm(ref.state_dict()), "diffusers-init SD VAE"), ref


def default_pair():
    """(ours, diffusers) for the shipped default model, or None if its weights are not there."""
    import latentctl
    from latentctl.registry import find_weights, get_entry

    try:
        find_weights(get_entry("default"))
    except Exception as e:  # noqa: BLE001 -- any reason the weights are missing: the benchmark says so and goes on
        print(f"default model: skipped ({str(e).splitlines()[0][:120]})")
        return None
    ours, _ = latentctl.load("default")
    c = ours.config
    ref = diffusers_vae([c.ch * m for m in c.ch_mult], c.num_res_blocks, c.z_channels)
    ref_sd = ref.state_dict()
    names = dict(zip(diffusers_to_ldm(ref_sd).keys(), ref_sd.keys()))   # ours -> diffusers, same order
    ours_sd = ours.state_dict()
    ref.load_state_dict({names[k]: v.reshape(ref_sd[names[k]].shape) for k, v in ours_sd.items()})
    return ours, ref


def photos(longest: int | None) -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in ("astronaut", "retina", "hubble_deep_field"):
        img = getattr(data, name)()[..., :3]
        if longest and max(img.shape[:2]) > longest:
            h, w = img.shape[:2]
            s = longest / max(h, w)
            img = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.LANCZOS))
        out[name] = img
    return out


def mosaic(size: int) -> np.ndarray:
    """size x size: the three photos and the astronaut mirrored, 2 x 2, each resized to fill its cell."""
    imgs = list(photos(None).values())
    imgs.append(imgs[0][:, ::-1])
    cell = size // 2
    rows = [np.concatenate([np.asarray(Image.fromarray(np.ascontiguousarray(i)).resize((cell, cell), Image.LANCZOS))
                            for i in imgs[r * 2:r * 2 + 2]], axis=1) for r in range(2)]
    return np.concatenate(rows, axis=0)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1], with no float temporaries (they would count in peak RSS)."""
    h, w = img.shape[:2]
    x = torch.empty(1, 3, h, w)
    x[0].copy_(torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1))
    return x.div_(127.5).sub_(1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Decoded images in [-1, 1], compared as the [0, 1] pictures they become."""
    a, b = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def target(name: str, value: float, ok: bool, need: str, cmd: str, unit: str = ""):
    value, ok = float(value), bool(ok)
    RESULTS.append(dict(target=name, value=value, ok=ok, need=need, cmd=cmd))
    shown = f"{value:.4g}{unit}" if isinstance(value, float) else f"{value}{unit}"
    print(f"  TARGET {name}: {shown} (need {need}) {'PASS' if ok else 'FAIL'}   [{cmd}]", flush=True)


# --- seams -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def seams(model_name, ours, ref, images: dict, tile: int, budget_fraction: float, cmd: str, with_diffusers: bool):
    """Tiled vs untiled on each image: latent relative L2 and decoded PSNR, ours and diffusers'."""
    for name, img in images.items():
        x = to_tensor(img)
        h, w = x.shape[-2:]
        print(f"{model_name} / {name} {w}x{h}:", flush=True)
        t_enc, post = timed(lambda: ours.encode(x))
        z = post.mean
        t_dec, y = timed(lambda: ours.decode(z))
        enc_budget = int(budget_fraction * tiling.estimate_memory(ours, x.shape, "encode"))
        dec_budget = int(budget_fraction * tiling.estimate_memory(ours, z.shape, "decode"))
        pe = tiling.plan(ours, x.shape, "encode", mode="on", tile_size=tile, budget=enc_budget)
        pd = tiling.plan(ours, z.shape, "decode", mode="on", tile_size=tile, budget=dec_budget)
        te, zt = timed(lambda: tiling.tiled_encode(ours, x, tile_plan=pe).mean)
        td, yt = timed(lambda: tiling.tiled_decode(ours, z, tile_plan=pd))
        print(f"  latentctl tiled ({tile} px tiles, budget {budget_fraction:g} x untiled estimate): "
              f"encode {te:.0f}s vs {t_enc:.0f}s untiled ({pe.cost_ratio:.2f}x predicted), "
              f"decode {td:.0f}s vs {t_dec:.0f}s ({pd.cost_ratio:.2f}x predicted)")
        if sum(p.numel() for p in ours.parameters()) < 10_000_000:   # a float64 reference is cheap: who is closer?
            ref64 = ours.double().encode(x.double()).mean
            ours.float()
            print(f"  vs a float64 untiled reference, latent rel L2: untiled fp32 {rel_l2(z, ref64):.1e}, "
                  f"tiled fp32 {rel_l2(zt, ref64):.1e}")
        target(f"{model_name}/{name} decode PSNR tiled vs untiled", psnr(yt, y), psnr(yt, y) >= 45, ">= 45 dB", cmd,
               " dB")
        target(f"{model_name}/{name} latent rel L2 tiled vs untiled", rel_l2(zt, z), rel_l2(zt, z) <= 0.01, "<= 1%",
               cmd)
        if with_diffusers:
            ref.enable_tiling()
            ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // 8
            dz = ref.encode(x).latent_dist.mean
            dy = ref.decode(z).sample
            ref.disable_tiling()
            print(f"  diffusers enable_tiling() ({tile} px tiles, overlap 0.25, same weights): "
                  f"decode PSNR {psnr(dy, y):.1f} dB, latent rel L2 {rel_l2(dz, z):.2%}", flush=True)
            RESULTS.append(dict(target=f"diffusers {model_name}/{name}", psnr=float(psnr(dy, y)),
                                rel_l2=float(rel_l2(dz, z))))


# --- cost --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def cost(ours, size: int, fraction: float, reps: int, cmd: str):
    """Untiled vs tiled time at size x size, where both fit, the tiled run within `fraction` of the untiled
    memory estimate (tile size chosen by the planner): interleaved, best of `reps`."""
    x = to_tensor(mosaic(size))
    z = ours.encode(x).mean
    for what, inp in (("decode", z), ("encode", x)):
        budget = int(fraction * tiling.estimate_memory(ours, inp.shape, what))
        p = tiling.plan(ours, inp.shape, what, mode="on", budget=budget)
        run_untiled = (lambda: ours.decode(inp)) if what == "decode" else (lambda: ours.encode(inp).mean)
        run_tiled = (lambda: tiling.tiled_decode(ours, inp, tile_plan=p)) if what == "decode" else \
            (lambda: tiling.tiled_encode(ours, inp, tile_plan=p).mean)
        best = {"untiled": float("inf"), "tiled": float("inf")}
        for _ in range(reps):
            for name, fn in (("untiled", run_untiled), ("tiled", run_tiled)):
                best[name] = min(best[name], timed(fn)[0])
        ratio = best["tiled"] / best["untiled"]
        print(f"  {what} {size}x{size}: untiled {best['untiled']:.1f}s, tiled {best['tiled']:.1f}s "
              f"({p.describe()})", flush=True)
        target(f"cost {what} {size}x{size} tiled/untiled time", ratio, ratio <= 1.3, "<= 1.3x", cmd, "x")


# --- memory: fresh processes -------------------------------------------------------------------------------------

def child(args):
    """One measured run in this (fresh) process; prints a JSON line with its peak RSS."""
    torch.set_num_threads(args.threads)
    kind, size = args.child, args.size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "diffusers-decode":
            from diffusers import AutoencoderKL as DiffusersVAE  # noqa: F401 -- the import is part of its footprint
            from safetensors.torch import load_file

            ref = diffusers_vae(**SD)
            ref.load_state_dict(load_file(args.weights + ".diffusers"))
            ref.enable_tiling()
            z = torch.randn(1, 4, size // 8, size // 8, generator=g)
            t, y = timed(lambda: ref.decode(z).sample)
            desc = f"diffusers enable_tiling(), tile {ref.tile_sample_min_size} px"
        else:
            vae = load_autoencoder(args.weights)
            report = {}
            if kind == "decode":
                z = torch.randn(1, 4, size // 8, size // 8, generator=g)
                t, y = timed(lambda: tiling.tiled_decode(vae, z, budget=args.budget, report=report))
            else:
                x = to_tensor(mosaic(size))
                t, y = timed(lambda: tiling.tiled_encode(vae, x, budget=args.budget, report=report).mean)
            desc = report["plan"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finite = bool(torch.isfinite(y).all())
    print(json.dumps(dict(kind=kind, size=size, seconds=t, peak_rss=peak, plan=desc, finite=finite)))


def spawn(kind: str, size: int, budget: int | None, weights: str, threads: int) -> dict:
    cmd = [sys.executable, str(HERE), "--child", kind, "--size", str(size), "--weights", weights,
           "--threads", str(threads)] + (["--budget", str(budget)] if budget else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(ours, ref, args, cmd: str):
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="latentctl-tiling-"))
    weights = str(folder / "sd-random.safetensors")
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, weights)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights + ".diffusers")
    runs = args.memory_runs
    diffusers_rss = args.diffusers_rss_2048
    try:
        if "diffusers2048" in runs:
            d = spawn("diffusers-decode", 2048, None, weights, args.threads)
            diffusers_rss = d["peak_rss"] / GB
            print(f"  diffusers tiled decode 2048x2048: peak RSS {diffusers_rss:.2f} GB, {d['seconds']:.0f}s "
                  f"({d['plan']})", flush=True)
        if "decode2048" in runs:
            o = spawn("decode", 2048, args.budget_2048, weights, args.threads)
            print(f"  latentctl tiled decode 2048x2048: peak RSS {o['peak_rss'] / GB:.2f} GB, {o['seconds']:.0f}s "
                  f"({o['plan']})", flush=True)
            target("peak RSS decode 2048x2048, latentctl vs diffusers tiled", o["peak_rss"] / GB,
                   o["peak_rss"] / GB <= diffusers_rss, f"<= {diffusers_rss:.2f} GB (diffusers tiled)", cmd, " GB")
        for kind in ("encode", "decode"):
            if f"{kind}4096" in runs:
                r = spawn(kind, 4096, args.budget_4096, weights, args.threads)
                print(f"  latentctl tiled {kind} 4096x4096: peak RSS {r['peak_rss'] / GB:.2f} GB, {r['seconds']:.0f}s, "
                      f"finite {r['finite']} ({r['plan']})", flush=True)
                target(f"peak RSS {kind} 4096x4096", r["peak_rss"] / GB, r["peak_rss"] <= 4 * GB, "<= 4 GB", cmd,
                       " GB")
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


# --- large: tiled vs untiled where untiled fits ------------------------------------------------------------------

@torch.no_grad()
def large(ours, sizes, budget: int, device: torch.device, cmd: str):
    """Tiled (within `budget`) vs untiled at big sizes, on a device where untiled fits; peak device memory."""
    ours = ours.to(device)
    cuda = device.type == "cuda"
    for size in sizes:
        x = to_tensor(mosaic(size)).to(device)
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        t_enc, z = timed(lambda: (ours.encode(x).mean, sync())[0])
        t_dec, y = timed(lambda: (ours.decode(z), sync())[0])
        untiled = {"encode": t_enc, "decode": t_dec}
        for what, inp in (("encode", x), ("decode", z)):
            p = tiling.plan(ours, inp.shape, what, mode="on", budget=budget)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t, out = timed(lambda: (tiling.tiled_encode(ours, inp, tile_plan=p).mean if what == "encode"
                                    else tiling.tiled_decode(ours, inp, tile_plan=p), sync())[0])
            peak = (torch.cuda.max_memory_allocated(device) - base) / GB if cuda else float("nan")
            print(f"  {what} {size}x{size} on {device}: tiled {t:.1f}s (untiled {untiled[what]:.1f}s), "
                  f"peak activations {peak:.2f} GB ({p.describe()})", flush=True)
            if what == "encode":
                target(f"large {size}x{size} latent rel L2 tiled vs untiled", rel_l2(out, z), rel_l2(out, z) <= 0.01,
                       "<= 1%", cmd)
            else:
                target(f"large {size}x{size} decode PSNR tiled vs untiled", psnr(out, y), psnr(out, y) >= 45,
                       ">= 45 dB", cmd, " dB")
            if cuda:
                target(f"large {size}x{size} {what} peak device memory within budget", peak, peak * GB <= budget,
                       f"<= {budget / GB:.2f} GB", cmd, " GB")
        del x, z, y


def parse_bytes(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos-full", action="store_true", help="photos at their own sizes (default: longest side 512)")
    ap.add_argument("--mosaics", type=int, nargs="*", default=None,
                    help="mosaics of the photos at these sizes (no sizes: 1024 2048)")
    ap.add_argument("--memory", action="store_true", help="peak RSS in fresh processes at 2048 and 4096 (hours)")
    ap.add_argument("--large", type=int, nargs="*", default=[], help="sizes for tiled vs untiled where untiled fits")
    ap.add_argument("--no-photos", action="store_true")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' tiled runs")
    ap.add_argument("--tile", type=int, default=256, help="tile side in image pixels (seams, cost)")
    ap.add_argument("--budget-fraction", type=float, default=0.5,
                    help="seams: the tiled runs get this fraction of the untiled memory estimate")
    ap.add_argument("--budget-2048", type=parse_bytes, default=parse_bytes("0.75G"),
                    help="activation budget of the 2048x2048 memory run")
    ap.add_argument("--budget-4096", type=parse_bytes, default=parse_bytes("2.25G"),
                    help="activation budget of the 4096x4096 memory runs")
    ap.add_argument("--budget-large", type=parse_bytes, default=parse_bytes("3G"), help="budget of --large runs")
    ap.add_argument("--memory-runs", nargs="+", default=MEMORY_RUNS, choices=MEMORY_RUNS,
                    help="which --memory runs (each in a fresh process), in this order")
    ap.add_argument("--diffusers-rss-2048", type=float, default=1.74,
                    help="GB; the bound for decode2048 when diffusers2048 is not run (the issue's measurement)")
    ap.add_argument("--reps", type=int, default=1, help="cost: best of this many interleaved runs")
    ap.add_argument("--cost-fraction", type=float, default=0.5,
                    help="cost: the tiled run gets this fraction of the untiled memory estimate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write every result to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":   # exact fp32 on both paths: no TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cmd = "python benchmarks/tiling.py " + " ".join(sys.argv[1:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}", flush=True)
    if args.large:
        from latentctl.modules import AEConfig, AutoencoderKL

        torch.manual_seed(0)   # diffusers is not needed here: PyTorch's default init, as diffusers uses
        ours = AutoencoderKL(AEConfig()).eval().requires_grad_(False)
        large(ours, args.large, args.budget_large, device, cmd)
    else:
        ours, ref = sd_pair()
        if not args.no_photos:
            seams("sd-random", ours, ref, photos(None if args.photos_full else 512), args.tile,
                  args.budget_fraction, cmd, not args.no_diffusers)
            pair = default_pair()
            if pair:
                seams("default", *pair, photos(None if args.photos_full else 512), args.tile,
                      args.budget_fraction, cmd, not args.no_diffusers)
        if args.mosaics is not None:
            for size in args.mosaics or (1024, 2048):
                need = tiling.estimate_memory(ours, (1, 4, size // 8, size // 8), "decode") + 4 * GB
                if need > tiling.budget._mem_available():
                    print(f"mosaic {size}: skipped, the untiled reference needs ~{need / GB:.0f} GB free")
                    continue
                seams("sd-random", ours, ref, {f"mosaic{size}": mosaic(size)}, args.tile, args.budget_fraction, cmd,
                      not args.no_diffusers)
        if not args.no_cost:
            print("cost (where both fit):", flush=True)
            cost(ours, 1024, args.cost_fraction, args.reps, cmd)
        if args.memory:
            print("memory (fresh process each):", flush=True)
            memory(ours, ref, args, cmd)
    failed = [r for r in RESULTS if r.get("ok") is False]
    print(f"{sum(1 for r in RESULTS if 'ok' in r)} targets, {len(failed)} failed", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
