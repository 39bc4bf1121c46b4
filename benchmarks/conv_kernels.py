"""Which kernel runs SD-VAE's fp32 3x3 convolutions fastest on this CPU: NNPACK's Winograd (modules/fastconv.py)
or oneDNN's direct kernels, NCHW or channels_last. The evidence behind fastconv.nnpack_ready's rule.

    python benchmarks/conv_kernels.py [--repeat 3]

One convolution per SD-VAE res-block shape (channels x image side at 512x512 input), batch 1, each kernel timed
in alternation (medians), with GFLOP/s (the direct convolution's count, for all three) and NNPACK's speed
against the faster direct layout.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from latentctl.modules import fastconv

SHAPES = [(128, 512), (256, 256), (512, 128), (512, 64)]   # encoder levels at 512x512; the decoder's in reverse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; NNPACK available: {fastconv.nnpack_available()}, "
          f"chosen for fp32: {fastconv.nnpack_ready()}")
    if not fastconv.nnpack_available():
        raise SystemExit("NNPACK is not available here (or LATENTCTL_NNPACK=0): nothing to compare")
    for c, side in SHAPES:
        g = torch.Generator().manual_seed(c)
        x = torch.randn(1, c, side, side, generator=g)
        w = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
        b = torch.zeros(c)
        xl, wl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        kernels = {"nnpack": lambda: fastconv._nnpack(x, w, b, 1),
                   "onednn nchw": lambda: F.conv2d(x, w, b, padding=1),
                   "onednn channels_last": lambda: F.conv2d(xl, wl, b, padding=1)}
        times = {k: [] for k in kernels}
        for k, f in kernels.items():
            f()   # warm-up (NNPACK's workspace, oneDNN's primitive cache)
        for r in range(args.repeat):
            for k in (kernels if r % 2 == 0 else reversed(kernels)):
                t = time.perf_counter()
                kernels[k]()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        gflop = 2 * c * c * 9 * side * side / 1e9
        direct = min(med["onednn nchw"], med["onednn channels_last"])
        cells = "  ".join(f"{k} {m * 1e3:7.1f} ms ({gflop / m:4.0f} GFLOP/s)" for k, m in med.items())
        print(f"{c:4d} ch at {side:3d}^2: {cells}  NNPACK vs faster direct: {direct / med['nnpack']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
