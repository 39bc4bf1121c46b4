"""The performance issue's targets, each measured as a ratio against diffusers in the same run.

    python benchmarks/performance.py [--size 512] [--repeat 3] [--quick]

SD-VAE architecture at full width with random weights (speed does not depend on the values), on this
machine's device. Ours and diffusers' AutoencoderKL with the same weights run interleaved (latentctl.bench),
so both see the same load. Targets (fp32, within 1e-4 of diffusers): encode and decode >= 1.25x diffusers
fp32; fastest accurate mode >= 3x diffusers fp32; batch 4 images/s >= batch 1. Each line prints the
measured value and the `latentctl bench` command that reproduces it. --quick: 256x256, repeat 1.
"""

import argparse

import torch

import latentctl
from latentctl import bench
from latentctl.api import cpu_has_fast_bf16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size, repeat = (256, 1) if args.quick else (args.size, args.repeat)
    vae, _ = latentctl.load("sd15", random_weights=True, device=args.device)
    device = next(vae.parameters()).device
    fmts = ("contiguous", "channels_last")
    fast = ["bf16"] if device.type == "cuda" or cpu_has_fast_bf16() else []
    rows = bench.run(vae, sizes=(size,), batches=(1,), dtypes=["fp32", *fast], memory_formats=fmts,
                     repeat=repeat, vs_diffusers=True, model_name="sd15")
    base = f"latentctl bench --model sd15 --random-weights --size {size} --repeat {repeat} --vs diffusers"
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    for what in ("encode", "decode"):
        fp32 = [r for r in ok_rows if r["what"] == what and r["dtype"] == "fp32"]
        # the reference is diffusers as people run it: fp32, default (contiguous) layout
        ref = next(r for r in fp32 if r["memory_format"] == "contiguous")["diffusers_images_per_s"]
        best = max(fp32, key=lambda r: r["images_per_s"])
        ratio = best["images_per_s"] / ref
        exact = best["diffusers_max_abs_diff"] <= 1e-4
        print(f"{what} fp32 ({best['memory_format']}) vs diffusers fp32: {ratio:.2f}x (same layout in both: "
              f"{best['vs_diffusers']:.2f}x; max diff {best['diffusers_max_abs_diff']:.1e}) target >= 1.25x and "
              f"<= 1e-4: {'PASS' if ratio >= 1.25 and exact else 'FAIL'}\n  {base} --what {what} "
              f"--memory-format contiguous,channels_last")
        fastest = max((r for r in ok_rows if r["what"] == what), key=lambda r: r["images_per_s"])
        ratio = fastest["images_per_s"] / ref
        print(f"{what} fastest mode ({fastest['dtype']}, {fastest['memory_format']}) vs diffusers fp32: {ratio:.2f}x "
              f"target >= 3x: {'PASS' if ratio >= 3 else 'FAIL'}"
              + ("" if fast else " (no bf16 kernels on this CPU: torch.ops.mkldnn._is_mkldnn_bf16_supported() "
                                 "is False, so fp32 is the fastest accurate mode)"))
    b = bench.run(vae, whats=("encode",), sizes=(size // 2,), batches=(1, 4), memory_formats=("channels_last",),
                  repeat=repeat)
    ips = {r["batch"]: r["images_per_s"] for r in b if r.get("status") == "ok"}
    print(f"batching: encode {size // 2}px images/s batch 4 = {ips.get(4)}, batch 1 = {ips.get(1)}: "
          f"{'PASS' if ips.get(4, 0) >= ips.get(1, 1e9) else 'FAIL'}\n  latentctl bench --model sd15 "
          f"--random-weights --what encode --size {size // 2} --batch 1,4 --memory-format channels_last")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
