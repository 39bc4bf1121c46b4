"""End-to-end `encode` of a folder of real photos against model-only time, in the same run.

    python benchmarks/encode_e2e.py [--n 64] [--sizes 512x512 512x384 384x512 640x448] [--batch-size 8]
                                    [--weights PATH | --model NAME] [--device auto] [--dtype auto] [--repeat 3]

The folder holds crops of scikit-image's photos (astronaut, coffee, chelsea, rocket, ...) in the given sizes
(cycled), saved alternately as JPEG and PNG. Model-only: the same images, already decoded and on the device,
grouped by size into batches as the pipeline groups them, through pipeline.run.encode_batch (the one place the
pipeline calls the model). End-to-end: pipeline.encode_files on the folder (reading, JPEG/PNG decoding,
conversion, padding, batching, the model, latent writing: everything but process start-up and model loading). The goal is end-to-end at >= 85% of model-only images/s.
Without --weights/--model a random-weight VAE with the default model's architecture is used.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

from latentctl import AEConfig, AutoencoderKL, load, resolve_device, resolve_dtype
from latentctl.api import ModelInfo
from latentctl.pipeline import Options, encode_batch, encode_files, plan_encode
from latentctl.pipeline.images import prepare, read_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "motorcycle_left")


def make_folder(folder: Path, n: int, sizes: list[tuple[int, int]]) -> None:
    """n photos, JPEG and PNG in turn, of the given (width, height) sizes in turn: crops at different offsets
    of real photos, each scaled so it covers the crop."""
    photos = []
    for name in PHOTOS:
        try:
            photos.append(getattr(data, name)())
        except Exception:  # some scikit-image photos are fetched on demand: use the ones that are here
            continue
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        w, h = sizes[i % len(sizes)]
        scale = max((w + 64) / im.width, (h + 64) / im.height)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        off = (i * 7) % 64
        crop = im.crop((off, off, off + w, off + h))
        if i % 2:
            crop.save(folder / f"{i:05d}.png")
        else:
            crop.save(folder / f"{i:05d}.jpg", quality=95)


def model_only(vae, folder: Path, options: Options) -> float:
    """Seconds spent in encode_batch for the same batches, with the images decoded beforehand."""
    device = next(vae.parameters()).device
    by_size: dict[tuple, list] = {}
    for path in sorted(folder.iterdir()):
        rgb = read_image(path.read_bytes(), max_pixels=options.max_pixels).rgb
        x = prepare(rgb, factor=vae.config.factor)[0]
        by_size.setdefault(tuple(x.shape), []).append(x)
    batches = [torch.stack(xs[i:i + options.batch_size]).to(device)
               for xs in by_size.values() for i in range(0, len(xs), options.batch_size)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x in batches:
        posterior = encode_batch(vae, x, options)
        posterior.mean.cpu()  # the pipeline brings every latent back to the host
    return time.perf_counter() - start


def end_to_end(vae, info, folder: Path, options: Options) -> float:
    out = Path(tempfile.mkdtemp(prefix="latentctl-bench-out-"))
    try:
        start = time.perf_counter()
        summary = encode_files(vae, info, plan_encode([str(folder)], out), options)
        seconds = time.perf_counter() - start
        if summary.failed or summary.ok != summary.total:
            sys.exit(f"end-to-end run failed: {summary}")
        return seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="number of photos")
    p.add_argument("--sizes", nargs="+", default=["512x512", "512x384", "384x512", "640x448"],
                   help="photo sizes WxH, used in turn")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="loader/writer threads (default: as the CLI)")
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the fastest of each is compared "
                                                          "(the run least disturbed by other load)")
    args = p.parse_args()

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    device = resolve_device(args.device)
    if args.model or args.weights:
        vae, info = load(args.model, weights=args.weights, device=str(device))
    else:
        torch.manual_seed(0)
        vae = AutoencoderKL(AEConfig(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=1)).eval().requires_grad_(False)
        vae, info = vae.to(device), ModelInfo("random-default-arch", "random", "random")
    options = Options(dtype=resolve_dtype(args.dtype, device), batch_size=args.batch_size,
                      workers=args.workers or min(8, os.cpu_count() or 1))
    folder = Path(tempfile.mkdtemp(prefix="latentctl-bench-photos-"))
    try:
        make_folder(folder, args.n, sizes)
        model_only(vae, folder, options)  # warm-up: kernels, allocator, page cache
        e2e, model = [], []
        for _ in range(args.repeat):
            model.append(model_only(vae, folder, options))
            e2e.append(end_to_end(vae, info, folder, options))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    m, e = min(model), min(e2e)
    fraction = m / e  # end-to-end images/s as a fraction of model-only
    print(f"photos        {args.n}, sizes {' '.join(args.sizes)}, JPEG and PNG, batch {args.batch_size}, "
          f"{options.workers} workers, device {device}, compute {str(options.dtype).replace('torch.', '')}, "
          f"model {info.name}")
    print(f"model only    {m:8.3f} s  {args.n / m:8.2f} images/s   (runs: {', '.join(f'{v:.3f}' for v in model)})")
    print(f"end to end    {e:8.3f} s  {args.n / e:8.2f} images/s   (runs: {', '.join(f'{v:.3f}' for v in e2e)})")
    print(f"fraction      {fraction:8.3f} of model-only images/s (goal >= 0.85: "
          f"{'met' if fraction >= 0.85 else 'NOT met'})")
    print("reproduce     python benchmarks/encode_e2e.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
