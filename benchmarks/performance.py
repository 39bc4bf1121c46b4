"""The performance issue's targets, each measured as a ratio against diffusers in the same run.

    python benchmarks/performance.py [--size 512] [--repeat 3] [--quick]

SD-VAE architecture at full width with random weights (speed does not depend on the values), on this
machine's device. Ours and diffusers' AutoencoderKL with the same weights run interleaved (latentctl.bench),
so both see the same load. Targets (fp32, within 1e-4 of diffusers): encode and decode >= 1.25x diffusers
fp32; fastest accurate mode >= 3x diffusers fp32; batch 4 images/s >= batch 1. Each line prints the
measured value and the `latentctl bench` command that reproduces it. --quick: 256x256, repeat 1.
--compile adds torch.compile against eager on the same model (the issue's "if it pays for its compile time").
"""

import argparse
import statistics
import time

import torch

import latentctl
from latentctl import bench, tiling
from latentctl.api import cpu_has_fast_bf16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile against eager")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also time a batch of 4 in one model call against image by image (tiling.SPLIT_BYTES)")
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
    ips = batch_images_per_s(vae, size // 2, (1, 4), max(repeat, 5))
    print(f"batching: encode {size // 2}px images/s batch 4 = {ips[4]:.3f}, batch 1 = {ips[1]:.3f} "
          f"({ips[4] / ips[1]:.2f}x): {'PASS' if ips[4] >= ips[1] else 'FAIL'}\n  latentctl bench --model sd15 "
          f"--random-weights --what encode --size {size // 2} --batch 1,4 --repeat 5")
    if args.one_at_a_time:  # SD-VAE, and the small default model where tiling.SPLIT_BYTES draws the line
        whole_batch_vs_one_at_a_time(vae, size // 2, max(repeat, 5))
        small, _ = latentctl.load("default", device=args.device)
        for s in (64, 128, 512):
            whole_batch_vs_one_at_a_time(small, s, max(repeat, 5))
    if args.compile:
        compiled_vs_eager(vae, size, repeat)


def alternated(fns: dict, repeat: int, device) -> tuple[dict[str, list[float]], float | None]:
    """Seconds per call of each fn over `repeat` rounds, the fns alternated (bench.measure, what `latentctl bench`
    times with: one warm-up each, the order flipped every round, so drift on a shared machine hits all of them),
    and the largest difference between the first two fns' outputs."""
    with bench.memory_meter(device) as meter:
        res, diff = bench.measure(fns, repeat, device, meter)
    return {name: r["times"] for name, r in res.items()}, diff


def on_model(vae, t: torch.Tensor) -> torch.Tensor:
    """t on the model's device, in its dtype and memory format."""
    p = next(vae.parameters())
    return t.to(p.device, p.dtype, memory_format=bench.MEMORY_FORMATS[bench.memory_format(vae)])


def whole_batch_vs_one_at_a_time(vae, size: int, repeat: int, batch: int = 4) -> None:
    """The measurement behind tiling.one_at_a_time: a batch in one model call against the same batch image by
    image (the ratio of the two times of each round, then the median over rounds)."""
    f = vae.config.factor
    cases = {"encode": (lambda t: vae.encode(t).mean, torch.rand(batch, 3, size, size) * 2 - 1),
             "decode": (vae.decode, torch.randn(batch, vae.config.latent_channels, size // f, size // f))}
    for what, (call, x) in cases.items():
        x = on_model(vae, x)
        times, _ = alternated({"whole": lambda: call(x),
                               "split": lambda: torch.cat([call(x[j:j + 1]) for j in range(batch)])},
                              repeat, x.device)
        ratios = [w / s for w, s in zip(times["whole"], times["split"])]
        print(f"{vae.config.ch}-channel model, {what} {size}px batch {batch}: image by image {statistics.median(ratios):.2f}x the whole batch's "
              f"speed (rounds: {' '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def batch_images_per_s(vae, size: int, batches, repeat: int) -> dict[int, float]:
    """Encode images/s at each batch size, as `encode` runs it (tiling.encode), the batch sizes alternated (bench
    times one case after another, and a few percent of drift would decide a comparison of near-equal rates)."""
    x = on_model(vae, torch.rand(max(batches), 3, size, size) * 2 - 1)
    times, _ = alternated({b: (lambda b=b: tiling.encode(vae, x[:b], mode="off").mean) for b in batches},
                          repeat, x.device)
    return {b: b / statistics.median(t) for b, t in times.items()}


def compiled_vs_eager(vae, size: int, repeat: int, batch: int = 1) -> list[dict]:
    """torch.compile (inductor, weights frozen so oneDNN can prepack them) against eager on the same model (its
    dtype and layout), alternated, and how many images a dataset run needs before the compile time is repaid."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    f = vae.config.factor
    cases = {"encode": (vae.encoder, torch.rand(batch, 3, size, size) * 2 - 1),
             "decode": (vae.decoder, torch.randn(batch, vae.config.z_channels, size // f, size // f))}
    rows = []
    for what, (module, x) in cases.items():
        x = on_model(vae, x)
        t0 = time.perf_counter()
        compiled = torch.compile(module)
        compiled(x).sum().item()  # .item(): waits for a GPU to finish
        compile_s = time.perf_counter() - t0
        times, diff = alternated({"eager": lambda: module(x), "compiled": lambda: compiled(x)}, repeat, x.device)
        eager, comp = (statistics.median(times[k]) / batch for k in ("eager", "compiled"))
        saved = eager - comp
        payback = f"repaid after {compile_s / saved:.0f} images" if saved > 0 else "never repaid"
        print(f"torch.compile {what} {size}px batch {batch}: {eager / comp:.2f}x eager ({comp:.4f} vs {eager:.4f} "
              f"s/image, max diff {diff:.1e}); compile + first call {compile_s:.0f} s, {payback}", flush=True)
        rows.append(dict(what=what, size=size, batch=batch, dtype=str(x.dtype), speedup=round(eager / comp, 3),
                         compiled_images_per_s=round(1 / comp, 2), eager_images_per_s=round(1 / eager, 2),
                         compile_s=round(compile_s, 1), max_abs_diff=diff))
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
