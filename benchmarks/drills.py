"""Reliability drills for a dataset run (issue 13). Prints one line of counts per drill.

    python benchmarks/drills.py                      # all three, 200 images, 16 kills, 50 early signals
    python benchmarks/drills.py --images 60 --kills 8 --early 20 --only kill9,early

kill9:  a 200-image encode killed with SIGKILL at random moments, again and again (each restart does the rest),
        then one last rerun to completion. Counts: corrupt outputs (unreadable latent files), missing outputs,
        temporary files left, outputs the final rerun redid, kills that landed.
early:  SIGINT and SIGTERM at random moments of the first 2 s of a run (start-up: imports, model loading,
        planning), `--early` times. A clean exit: exit 130/143 (or death by that very signal before Python's own
        handlers exist, which a shell also reports as 130/143), no traceback, nothing partial written.
stale:  encode, replace a third of the images with other photos (same names), touch another third, encode again.
        Counts: redone as "source changed" (must be the replaced third), skipped (the rest), stale outputs left
        (latent whose source_sha256 is not its image's).

The model is a small random-weight VAE (factor 2; the drills are about the pipeline, not the model); images are
crops of scikit-image's photos. Everything runs in a temporary folder.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data

from latentctl import AEConfig, AutoencoderKL

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def _weights(folder: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), folder / "vae.safetensors")
    (folder / "config.json").write_text(json.dumps({"scaling_factor": 0.5, "shift_factor": 0.1}))
    return folder / "vae.safetensors"


def _images(folder: Path, count: int, seed: int = 0, size: int = 48) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in PHOTOS]
    paths = []
    for i in range(count):
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        path = folder / f"{i % 7}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p[y:y + size, x:x + size]).save(path)
        paths.append(path)
    return paths


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "latentctl", *map(str, args)]


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.get_tensor("latent")
        return True
    except Exception:
        return False


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def kill9(work: Path, weights: Path, images: int, kills: int, rng: random.Random) -> dict:
    src, out = work / "k-imgs", work / "k-out"
    _images(src, images)
    args = _command("encode", src, "-o", out, "-w", weights, "--batch-size", "2", "--workers", "2", "-q")
    landed = 0
    for _ in range(kills):
        before = len(list(out.rglob("*.safetensors")))
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list(out.rglob("*.safetensors"))) <= before:
            time.sleep(0.01)  # past start-up: the run is writing
        time.sleep(rng.uniform(0.0, 1.5))  # then a random moment of the run
        if proc.poll() is None:
            proc.kill()
            landed += 1
        proc.wait()
        if len(list(out.rglob("*.safetensors"))) >= images:
            break
    present = list(out.rglob("*.safetensors"))
    corrupt = sum(not _readable(p) for p in present)
    temps = len([p for p in out.rglob("*") if p.name.endswith(".latentctl-tmp")])
    final = subprocess.run(args[:-1] + ["--json"], capture_output=True, text=True)
    records = _records(final.stdout)
    after = list(out.rglob("*.safetensors"))
    return {"kills": landed, "present_before_rerun": len(present), "corrupt": corrupt, "temp_files": temps,
            "rerun_ok": sum(r["status"] == "ok" for r in records),
            "rerun_redone": sum(bool(r.get("redone")) for r in records),
            "missing_after_rerun": images - len(after), "corrupt_after_rerun": sum(not _readable(p) for p in after),
            "temp_after_rerun": len([p for p in out.rglob("*") if p.name.endswith(".latentctl-tmp")]),
            "rerun_exit": final.returncode}


def early(work: Path, weights: Path, trials: int, rng: random.Random) -> dict:
    src = work / "e-imgs"
    _images(src, 8, seed=1)
    clean = tracebacks = other = 0
    codes: dict = {}
    where: list[str] = []
    for i in range(trials):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        out = work / f"e-out-{i}"
        proc = subprocess.Popen(_command("encode", src, "-o", out, "-w", weights, "-q"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            codes["hung"] = codes.get("hung", 0) + 1
            other += 1
            continue
        rc = proc.returncode
        codes[rc] = codes.get(rc, 0) + 1
        partial = out.exists() and [p for p in out.rglob("*") if p.name.endswith(".latentctl-tmp")
                                    or (p.suffix == ".safetensors" and not _readable(p))]
        if "Traceback" in err:
            tracebacks += 1
            where.append(" | ".join(err.strip().splitlines()[-3:]))
        elif rc in (128 + sig, -sig) and not partial:
            clean += 1
        else:
            other += 1
    return {"trials": trials, "clean": clean, "tracebacks": tracebacks, "other": other,
            "exit_codes": {str(k): v for k, v in sorted(codes.items(), key=str)}, "tracebacks_end": where}


def stale(work: Path, weights: Path, images: int) -> dict:
    src, out = work / "s-imgs", work / "s-out"
    paths = _images(src, images, seed=2)
    args = _command("encode", src, "-o", out, "-w", weights, "--json", "-q")
    subprocess.run(args, capture_output=True, check=True)
    third = len(paths) // 3
    replaced, touched = paths[:third], paths[third:2 * third]
    fresh = _images(work / "s-new", third, seed=3)
    for old, new in zip(replaced, fresh):
        old.write_bytes(new.read_bytes())
    for p in touched:
        os.utime(p)
    result = subprocess.run(args, capture_output=True, text=True)
    records = {Path(r["input"]).resolve(): r for r in _records(result.stdout)}
    stale_left = 0
    for p in paths:
        latent = out / p.relative_to(src).with_suffix(".safetensors")
        with safe_open(str(latent), "pt") as f:
            stale_left += f.metadata()["source_sha256"] != hashlib.sha256(p.read_bytes()).hexdigest()
    redone = [p for p, r in records.items() if r.get("redone") == "source changed"]
    return {"images": images, "replaced": len(replaced), "touched": len(touched),
            "redone_source_changed": len(redone),
            "redone_exactly_the_replaced": set(redone) == {p.resolve() for p in replaced},
            "skipped": sum(r["status"] == "skipped" for r in records.values()), "stale_left": stale_left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--kills", type=int, default=16)
    ap.add_argument("--early", type=int, default=50)
    ap.add_argument("--only", default="kill9,early,stale")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = _weights(work / "model")
        for name in args.only.split(","):
            t = time.perf_counter()
            if name == "kill9":
                result = kill9(work, weights, args.images, args.kills, rng)
            elif name == "early":
                result = early(work, weights, args.early, rng)
            elif name == "stale":
                result = stale(work, weights, min(args.images, 60))
            else:
                raise SystemExit(f"unknown drill {name!r}")
            print(f"{name}: {json.dumps(result)} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
