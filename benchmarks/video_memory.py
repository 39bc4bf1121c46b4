"""Peak memory of `latentctl encode` on a short and a 10x longer clip: streaming means the ratio is about 1.

Two mp4 clips of the same frames (a scikit-image photo panned across, W x H) differ only in length (24 and
240 frames by default). Each is encoded by `latentctl encode` in a fresh process with the shipped default model
(or --weights), and the peak RSS of that process (ru_maxrss of the child) is read when it exits. For scale,
the script also prints what the long clip's frames alone would take if a reader held them as the model's
float32 input (T x 3 x H x W x 4 bytes) - the memory a non-streaming reader would add.

    python benchmarks/video_memory.py                       # 24 vs 240 frames of 320x240
    python benchmarks/video_memory.py --frames 24 480 --size 256x256 --json
    python benchmarks/video_memory.py --size 512x512 --device cuda --batch-size 16
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_clip(path: Path, frames: int, width: int, height: int, fps: int = 24) -> None:
    import imageio.v3 as iio
    import numpy as np
    from skimage import data

    photo = data.astronaut()  # 512x512
    with iio.imopen(path, "w", plugin="pyav") as out:
        out.init_video_stream("libx264", fps=fps)
        for k in range(frames):  # a window sliding right and down, back and forth
            step = k % 64 if (k // 64) % 2 == 0 else 63 - k % 64
            top, left = step * 2, step * 3
            crop = photo[top:top + 384, left:left + 320]
            ys = np.linspace(0, crop.shape[0] - 1, height).astype(int)
            xs = np.linspace(0, crop.shape[1] - 1, width).astype(int)
            out.write_frame(np.ascontiguousarray(crop[ys][:, xs]))


def measure(clip: Path, out: Path, extra: list[str]) -> dict:
    """Run the encode in a wrapper process, so ru_maxrss of its children is this encode's alone."""
    cmd = [sys.executable, "-m", "latentctl", "encode", str(clip), "-o", str(out), "--quiet", *extra]
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               f"r = subprocess.run({cmd!r}, cwd={str(ROOT)!r}); "
               "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"encode failed: {done.stderr.strip()}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["rc"] != 0:
        raise SystemExit(f"encode exited {row['rc']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs=2, default=[24, 240], metavar=("SHORT", "LONG"))
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the frames")
    parser.add_argument("--weights", help="a weights file instead of the shipped default model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (peak RSS is host memory either way)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    extra = ["--batch-size", str(args.batch_size), "--device", args.device]
    extra += ["--weights", args.weights] if args.weights else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            clip = Path(tmp) / f"clip{n}.mp4"
            make_clip(clip, n, width, height)
            row = measure(clip, Path(tmp) / f"lat{n}", extra)
            row |= {"frames": n, "size": f"{width}x{height}", "device": args.device,
                    "frames_as_float32_mb": n * 3 * width * height * 4 / 2**20,
                    "latent_file_mb": (Path(tmp) / f"lat{n}" / f"clip{n}.safetensors").stat().st_size / 2**20}
            rows.append(row)
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    # frames per second of the longer clip's extra frames: start-up and model loading cancel out
    marginal = (rows[1]["frames"] - rows[0]["frames"]) / (rows[1]["seconds"] - rows[0]["seconds"])
    if args.json:
        print(json.dumps({"rows": rows, "ratio": ratio, "marginal_frames_per_second": marginal}))
        return
    for r in rows:
        print(f"{r['frames']:5d} frames {r['size']} ({r['device']}): peak RSS {r['peak_rss_mb']:7.1f} MB, "
              f"{r['seconds']:6.1f} s including start-up "
              f"(latent file {r['latent_file_mb']:.1f} MB; the frames as float32 would be "
              f"{r['frames_as_float32_mb']:.0f} MB)")
    print(f"peak RSS ratio long/short: {ratio:.3f}; {marginal:.1f} frames/s for the extra frames "
          "(read, encode, spool; start-up excluded)")


if __name__ == "__main__":
    main()
