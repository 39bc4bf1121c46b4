"""Scale-out on one machine: 1 process x 2 threads vs 2 ranks x 1 thread (torchrun), and the Ray engine vs the
single process, on the same images, in one run (so the ratios share this machine's load).

    python benchmarks/scale.py [--n 200] [--size 256] [--model default] [--batch-size 4] [--skip-ray]

Every configuration is the CLI in fresh processes (`python -m latentctl encode ... --json`, torchrun for the
ranks), writing into an empty folder. Reported per configuration: wall time of the command (start-up, model
load, Ray's cluster start included), images/s over the wall time, and steady-state images/s: (n - 1) / the time
between the first and the last record on stdout (what a long job sees; start-up excluded). The overhead per image
of an engine is its steady-state seconds per image minus the single process's.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")


def make_folder(folder: Path, n: int, size: int) -> None:
    """n crops (size x size) at different offsets of scikit-image's photos, JPEG and PNG in turn."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    for i in range(n):
        im = photos[i % len(photos)]
        scale = size / min(im.size) * rng.uniform(1.0, 1.5)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        x, y = rng.integers(0, im.width - size + 1), rng.integers(0, im.height - size + 1)
        crop = im.crop((x, y, x + size, y + size))
        sub = folder / f"{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        crop.save(sub / f"{i:05d}.{'jpg' if i % 2 else 'png'}", quality=95)


def timed(cmd: list[str], env: dict, n: int) -> dict:
    """Run cmd; time stamps of its JSON lines on stdout -> wall and steady-state rates."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stamps = []
    for line in p.stdout:
        if line.startswith("{") and '"status": "ok"' in line:
            stamps.append(time.perf_counter())
    err = p.stderr.read()
    p.wait()
    wall = time.perf_counter() - start
    if p.returncode != 0 or len(stamps) != n:
        raise SystemExit(f"{' '.join(cmd[:6])}...: exit {p.returncode}, {len(stamps)} of {n} ok\n{err[-2000:]}")
    steady = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"wall_s": wall, "images_per_s": n / wall, "steady_images_per_s": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="latentctl-scale-"))
    try:
        imgs = root / "imgs"
        make_folder(imgs, args.n, args.size)
        base = ["encode", str(imgs), "--model", args.model, "--batch-size", str(args.batch_size), "--json"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        configs = {
            "1 process x 2 threads": ([sys.executable, "-m", "latentctl", *base, "--workers", "2"],
                                      {"OMP_NUM_THREADS": "2"}),
            "2 ranks x 1 thread (torchrun)": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                               "--master-port", "0", "-m", "latentctl", *base, "--workers", "1"],
                                              {"OMP_NUM_THREADS": "1"}),
        }
        if not args.skip_ray:
            configs["ray engine (local, 2 CPUs)"] = ([sys.executable, "-m", "latentctl", *base, "--workers", "2",
                                                      "--engine", "ray"], {"OMP_NUM_THREADS": "2"})
        results = {}
        for name, (cmd, extra) in configs.items():
            out = root / f"out-{len(results)}"
            results[name] = timed([*cmd, "-o", str(out)], {**env, **extra}, args.n)
            r = results[name]
            print(f"{name:32s} wall {r['wall_s']:7.1f} s  {r['images_per_s']:6.2f} images/s  "
                  f"steady {r['steady_images_per_s']:6.2f} images/s", flush=True)
        ref = results["1 process x 2 threads"]
        print(f"\n{args.n} images {args.size}x{args.size}, model {args.model}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs")
        for name, r in results.items():
            if name == "1 process x 2 threads":
                continue
            over = 1000 * (1 / r["steady_images_per_s"] - 1 / ref["steady_images_per_s"])
            print(f"{name} / single process: wall {r['images_per_s'] / ref['images_per_s']:.2f}x, "
                  f"steady state {r['steady_images_per_s'] / ref['steady_images_per_s']:.2f}x "
                  f"({over:+.1f} ms per image)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
