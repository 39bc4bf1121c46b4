"""Peak memory of the decoder's mid block (ResnetBlock, attention, ResnetBlock) at 2048x2048 on CPU, per backend.

At 2048x2048 the SD-VAE mid block sees 256x256 = 65,536 tokens of 512 channels; an N x N attention matrix
would be 16 GiB in fp32. Each backend runs in a fresh process (peak RSS is per process), after a small
warm-up that loads the libraries without building anything large, so the peak measured is this block's.
The child's address space is capped (--cap-gb) so a backend that does build N x N fails cleanly instead
of taking the machine's memory.

    python benchmarks/attention_memory.py                 # all backends, 2048x2048, full mid block
    python benchmarks/attention_memory.py --attn-only     # the attention block alone (skips 1.2 TFLOP of convs)
    python benchmarks/attention_memory.py --size 1024 --json
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHANNELS = 512  # the SD-VAE mid block's width
BLOCKS = ["sdpa", "xformers", "linear", "linear-layout"]  # linear-layout: a to_qkv checkpoint's own block


def child(block: str, size: int, attn_only: bool) -> dict:
    import torch
    from torch import nn

    from latentctl.errors import BackendUnavailable
    from latentctl.modules import LinAttnBlock, ResnetBlock, make_attn
    from latentctl.modules.attention import check_backend

    side = size // 8
    row = {"block": block, "tokens": side * side, "channels": CHANNELS, "nxn_mb": side**4 * 4 / 2**20}
    if block != "linear-layout":
        try:
            check_backend(block, "cpu")
        except BackendUnavailable as e:
            return {**row, "status": "unavailable", "reason": str(e)}
    torch.manual_seed(0)
    attn = LinAttnBlock(CHANNELS) if block == "linear-layout" else make_attn(CHANNELS, "vanilla", block)
    parts = [attn] if attn_only else [ResnetBlock(in_channels=CHANNELS), attn, ResnetBlock(in_channels=CHANNELS)]
    mid = nn.Sequential(*parts).eval()
    x = torch.randn(1, CHANNELS, side, side)
    with torch.inference_mode():
        mid(x[..., :16, :16])  # warm-up: thread pools and kernels, nothing large
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)
        t0 = time.perf_counter()
        try:
            y = mid(x)
        except (RuntimeError, MemoryError) as e:
            return {**row, "status": "failed", "reason": str(e).splitlines()[0][:200]}
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert torch.isfinite(y).all()
    return {**row, "status": "ok", "base_mb": round(base), "peak_mb": round(peak), "grown_mb": round(peak - base),
            "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (the latent is size/8)")
    p.add_argument("--attn-only", action="store_true", help="run the attention block alone")
    p.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated subset of " + ",".join(BLOCKS))
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each child process")
    p.add_argument("--json", action="store_true", help="one JSON object per backend on stdout")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        cap = int(args.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(child(args.child, args.size, args.attn_only)))
        return
    what = "attention block" if args.attn_only else "mid block (resnet, attention, resnet)"
    side = args.size // 8
    print(f"{what} of a {args.size}x{args.size} decode: {side * side} tokens x {CHANNELS} channels, fp32, CPU; "
          f"an N x N matrix would take {side**4 * 4 / 2**30:.2f} GiB", file=sys.stderr)
    print(f"{'block':14} {'status':12} {'peak RSS MB':>11} {'grown MB':>9} {'seconds':>8}  note", file=sys.stderr)
    for block in args.blocks.split(","):
        cmd = [sys.executable, __file__, "--child", block, "--size", str(args.size), "--cap-gb", str(args.cap_gb)]
        cmd += ["--attn-only"] if args.attn_only else []
        res = subprocess.run(cmd, capture_output=True, text=True)
        try:
            row = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"block": block, "status": "crashed", "reason": (res.stderr.strip().splitlines() or ["?"])[-1]}
        if args.json:
            print(json.dumps(row), flush=True)
        print(f"{block:14} {row['status']:12} {row.get('peak_mb', '-'):>11} {row.get('grown_mb', '-'):>9} "
              f"{row.get('seconds', '-'):>8}  {row.get('reason', '')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
