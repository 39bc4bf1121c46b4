"""Tar shards against loose files, in the same run: encode throughput, read throughput, streaming memory.

    python benchmarks/shards.py [--n 64] [--sizes 512x512 512x384 384x512 640x448] [--batch-size 8]
                                [--shard-size 16] [--repeat 3] [--weights PATH | --model NAME] [--device auto]

1. Encode: the photos of benchmarks/encode_e2e.py (crops of scikit-image photos, JPEG and PNG in turn) as loose
   files and as WebDataset shards of --shard-size samples (each with a .txt caption). Model-only time (the same
   batches, decoded beforehand, through pipeline.run.encode_batch) is the reference; then encode_files on the
   loose folder (one latent file per image) and on the shards (--to wds), alternated --repeat times, fastest of
   each. Goal: shards at >= 85% of model-only images/s.
2. Read: the latents just written, loaded by a plain torch DataLoader loop (batch 1, no workers): one
   .safetensors file per sample against the latent shards streamed by pipeline.sources.
3. Memory: Python's peak traced allocation while streaming every sample of one shard, for shards of 1x, 4x and
   16x --shard-size samples (flat: one sample is held at a time, whatever the shard's size).
Without --weights/--model a random-weight VAE with the default model's architecture is used.
"""

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from safetensors.torch import load as st_load

sys.path.insert(0, str(Path(__file__).parent))
from encode_e2e import make_folder, model_only  # noqa: E402

from latentctl import AEConfig, AutoencoderKL, load, resolve_device, resolve_dtype  # noqa: E402
from latentctl.api import ModelInfo  # noqa: E402
from latentctl.pipeline import Options, encode_files, plan_encode  # noqa: E402
from latentctl.pipeline import datasets, sources  # noqa: E402


def make_shards(folder: Path, shards: Path, shard_size: int) -> None:
    """The loose photos as shards of shard_size samples: KEY.jpg/png + KEY.txt."""
    files = sorted(folder.iterdir())
    shards.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), shard_size):
        with tarfile.open(shards / f"{start // shard_size:05d}.tar", "w") as tar:
            for f in files[start:start + shard_size]:
                for name, blob in ((f.name, f.read_bytes()), (f.stem + ".txt", f"a photo {f.stem}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))


def encode_loose(vae, info, folder: Path, out: Path, options: Options) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = encode_files(vae, info, plan_encode([str(folder)], out), options)
    seconds = time.perf_counter() - start
    if summary.failed or summary.ok != summary.total:
        sys.exit(f"loose-file run failed: {summary}")
    return seconds


def encode_shards(vae, info, shards: Path, out: Path, options: Options) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    items, sink = datasets.plan_encode([str(shards)], out, to="wds")
    summary = encode_files(vae, info, items, options, sink=sink)
    seconds = time.perf_counter() - start
    if summary.failed or summary.ok != summary.total:
        sys.exit(f"shard run failed: {summary}")
    return seconds


class _Files(torch.utils.data.Dataset):
    def __init__(self, folder: Path):
        self.paths = sorted(folder.rglob("*.safetensors"))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return st_load(self.paths[i].read_bytes())["latent"]


class _Shards(torch.utils.data.IterableDataset):
    def __init__(self, folder: Path):
        self.shards = sources.discover_shards([str(folder)])

    def __iter__(self):
        for shard in self.shards:
            for item in sources.samples(shard, "latent"):
                if item.error is not None:
                    sys.exit(f"{item.source}: {item.error}")
                yield st_load(item.data)["latent"]


def read_rate(dataset) -> tuple[int, float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=0, collate_fn=lambda b: b)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch)
    return n, n / (time.perf_counter() - start)


def stream_peak(shards: Path, samples_per_shard: int, blob: bytes) -> float:
    """MiB peak traced while streaming one shard of samples_per_shard samples of `blob`."""
    path = shards / f"mem-{samples_per_shard}.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(samples_per_shard):
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    shard = sources.discover_shards([str(path)])[0]
    tracemalloc.start()
    for item in sources.samples(shard):
        del item
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = path.stat().st_size
    path.unlink()
    return size / 2**20, peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--sizes", nargs="+", default=["512x512", "512x384", "384x512", "640x448"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeat", type=int, default=3)
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
    root = Path(tempfile.mkdtemp(prefix="latentctl-bench-shards-"))
    try:
        folder, shards = root / "photos", root / "shards"
        folder.mkdir()
        make_folder(folder, args.n, sizes)
        make_shards(folder, shards, args.shard_size)
        model_only(vae, folder, options)  # warm-up
        model, loose, tar = [], [], []
        for _ in range(args.repeat):
            model.append(model_only(vae, folder, options))
            loose.append(encode_loose(vae, info, folder, root / "out-files", options))
            tar.append(encode_shards(vae, info, shards, root / "out-wds", options))
        n_files, files_rate = read_rate(_Files(root / "out-files"))
        n_shards, shards_rate = read_rate(_Shards(root / "out-wds"))
        blob = next(folder.glob("*.jpg")).read_bytes()
        memory = [stream_peak(root, k * args.shard_size, blob) for k in (1, 4, 16)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m, lo, ta = min(model), min(loose), min(tar)
    print(f"photos        {args.n}, sizes {' '.join(args.sizes)}, JPEG and PNG, shards of {args.shard_size}, "
          f"batch {args.batch_size}, {options.workers} workers, device {device}, "
          f"compute {str(options.dtype).replace('torch.', '')}, model {info.name}")
    print(f"model only    {m:8.3f} s  {args.n / m:8.2f} images/s   (runs: {', '.join(f'{v:.3f}' for v in model)})")
    print(f"loose files   {lo:8.3f} s  {args.n / lo:8.2f} images/s   (runs: {', '.join(f'{v:.3f}' for v in loose)})"
          f"  {m / lo:.3f} of model-only")
    print(f"tar shards    {ta:8.3f} s  {args.n / ta:8.2f} images/s   (runs: {', '.join(f'{v:.3f}' for v in tar)})"
          f"  {m / ta:.3f} of model-only (goal >= 0.85: {'met' if m / ta >= 0.85 else 'NOT met'}); "
          f"shards/loose {lo / ta:.3f}")
    print(f"read          files {files_rate:9.1f} latents/s ({n_files}), shards {shards_rate:9.1f} latents/s "
          f"({n_shards}): shards/files {shards_rate / files_rate:.2f}x  (DataLoader, batch 1, no workers)")
    print("stream memory " + ", ".join(f"{size:.1f} MiB shard: peak {peak:.2f} MiB" for size, peak in memory))
    print("reproduce     python benchmarks/shards.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
