"""CUDA checks in one short run (for a lent GPU): xformers vs sdpa agreement, and throughput.

    python benchmarks/gpu_check.py [--sizes 512,1024] [--out gpu_check.json]

SD-VAE architecture at full width with random weights (FLOPs and speed do not depend on the values).
For bf16 and fp16 x sdpa and xformers, encode and decode: images/s and the fraction of the bf16 dense
roofline (790 TFLOP/s, the measured 8192^3 bf16 matmul rate of an H200) reached, with FLOPs counted
by torch.utils.flop_counter on the same model and size. Writes JSON rows to --out.
"""

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import latentctl
from latentctl.modules.attention import check_backend

ROOFLINE = 790e12


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    backends = ["sdpa"]
    try:
        check_backend("xformers", dev)
        import xformers
        backends.append("xformers")
        print("xformers", xformers.__version__)
    except Exception as e:  # report and go on with sdpa alone
        print(f"xformers unavailable: {e}")
    vae, _ = latentctl.load("sd15", random_weights=True, device="cuda")
    rows = []
    # agreement: xformers vs sdpa in fp16 on real-size attention (mid block of a 512x512 image)
    if "xformers" in backends:
        from latentctl.modules.attention import sdpa_attention, xformers_attention
        q, k, v = (torch.randn(2, 4096, 512, device=dev, dtype=torch.float16) for _ in range(3))
        err = (xformers_attention(q, k, v).float() - sdpa_attention(q, k, v).float()).abs().max().item()
        m16 = vae.to(torch.float16).to(memory_format=torch.channels_last)
        x = torch.rand(2, 3, 512, 512, device=dev, dtype=torch.float16) * 2 - 1
        m16.set_attn_backend("sdpa")
        a = m16.decode(m16.encode(x).mean)
        m16.set_attn_backend("xformers")
        b = m16.decode(m16.encode(x).mean)
        rows.append({"check": "xformers_vs_sdpa_fp16", "attention_max_abs": err,
                     "roundtrip_max_abs": (a.float() - b.float()).abs().max().item()})
        print(json.dumps(rows[-1]))
    for size in [int(s) for s in args.sizes.split(",")]:
        batch = 8 if size <= 512 else 2
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            m = vae.to(dtype).to(memory_format=torch.channels_last)
            x = (torch.rand(batch, 3, size, size, device=dev, dtype=dtype) * 2 - 1).contiguous(
                memory_format=torch.channels_last)
            z = m.encode(x).mean
            for what, fn in (("encode", lambda: m.encode(x).mean), ("decode", lambda: m.decode(z))):
                m.set_attn_backend("sdpa")
                total_flops = flops(fn) / batch
                for backend in backends:
                    m.set_attn_backend(backend)
                    torch.cuda.reset_peak_memory_stats()
                    sec = timed(fn, args.repeat)
                    ips = batch / sec
                    row = {"what": what, "size": size, "batch": batch, "dtype": dtype_name, "attn": backend,
                           "images_per_s": round(ips, 1), "ms_per_image": round(1000 / ips, 2),
                           "tflop_per_image": round(total_flops / 1e12, 3),
                           "roofline_fraction": round(total_flops * ips / ROOFLINE, 3),
                           "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"gpu_check took {time.time() - t:.0f}s")
