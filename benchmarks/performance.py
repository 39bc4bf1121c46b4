"""The performance issue's targets, each measured as a ratio against diffusers in the same run.

    python benchmarks/performance.py [--size 512] [--repeat 3] [--quick]

SD-VAE architecture at full width with random weights (speed does not depend on the values), on this
machine's device. Ours and diffusers' AutoencoderKL with the same weights run interleaved (latentctl.bench),
so both see the same load. Targets (fp32, within 1e-4 of diffusers): encode and decode >= 1.25x diffusers
fp32; fastest accurate mode >= 3x diffusers fp32; batch 4 images/s >= batch 1. Each line prints the
measured value and the `latentctl bench` command that reproduces it. --quick: 256x256, repeat 1.
--compile adds torch.compile against eager on the same model (the issue's "if it pays for its compile time").

    python benchmarks/performance.py --precision [--sizes 256,512] [--repeat 3] [--force-bf16]

--precision (the bf16 issue) runs only this: latentctl fp32, diffusers fp32, latentctl bf16 (weights held in bf16,
as `--dtype bf16`/`auto` load them) and diffusers cast to bf16 (`.to(torch.bfloat16)`, as a user would), all four
interleaved in one run per case, with the ratios against the targets and the CPU features seen; diffusers in
channels_last (fp32 and bf16-cast), which a user could also set, run alongside and are reported, not targeted.
On a CPU without bf16 kernels the bf16 pair is skipped (~100x slower there; --force-bf16 times it anyway). With
$OUT set, the rows also go to $OUT/precision.json.
"""

import copy
import json
import os

import argparse
import statistics
import time

import torch

import latentctl
from latentctl import bench, tiling
from latentctl.api import cpu_has_fast_bf16
from latentctl.modules import fastconv, precision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile against eager")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also time a batch of 4 in one model call against image by image (tiling.SPLIT_BYTES)")
    ap.add_argument("--precision", action="store_true",
                    help="only latentctl fp32/bf16 vs diffusers fp32/bf16-cast, interleaved (see the docstring)")
    ap.add_argument("--sizes", default="256,512", help="--precision: comma-separated image sides")
    ap.add_argument("--force-bf16", action="store_true", help="--precision: time bf16 even without bf16 kernels")
    args = ap.parse_args()
    if args.precision:
        vae, _ = latentctl.load("sd15", random_weights=True, device=args.device)
        print(cpu_features(next(vae.parameters()).device), flush=True)
        rows = [precision_case(vae, what, int(s), args.repeat, args.force_bf16)
                for s in args.sizes.split(",") for what in ("encode", "decode")]
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "precision.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return
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


def cpu_features(device) -> str:
    """The CPU (or GPU), the instruction sets that decide bf16 speed, and what --dtype auto picks here."""
    flags, model = set(), "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    seen = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{where}; CPU: {model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; "
            f"flags: {' '.join(seen) or 'none of avx2/avx512/amx'}; torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); oneDNN bf16 kernels: "
            f"{precision.cpu_has_bf16_kernels()}; fp32 3x3 convolutions: "
            f"{'NNPACK (NCHW)' if fastconv.nnpack_ready() else 'oneDNN (channels_last)'}; --dtype auto here: "
            f"{latentctl.resolve_dtype('auto', device)}")


def precision_case(vae, what: str, size: int, repeat: int, force_bf16: bool = False) -> dict:
    """One interleaved run of latentctl fp32 / diffusers fp32 / latentctl bf16 / diffusers bf16-cast (bench.measure:
    one warm-up each, order flipped every round); prints the medians, the ratios and the targets."""
    device = next(vae.parameters()).device
    twin = bench.diffusers_twin(vae)  # diffusers as people run it: fp32, contiguous
    models = {"latentctl fp32": vae, "diffusers fp32": twin}
    bf16 = device.type == "cuda" or precision.cpu_has_bf16_kernels() or force_bf16
    if bf16:
        models["latentctl bf16"] = bench.prepare(vae, torch.bfloat16, bench.auto_format(vae, torch.bfloat16))  # as load holds it
        models["diffusers bf16"] = torch.nn.Module.to(copy.deepcopy(twin), dtype=torch.bfloat16)
    # not targets: diffusers as a user who also sets channels_last runs it (oneDNN's faster layout on a CPU)
    models["diffusers fp32 cl"] = torch.nn.Module.to(copy.deepcopy(twin), memory_format=torch.channels_last)
    if bf16:
        models["diffusers bf16 cl"] = torch.nn.Module.to(copy.deepcopy(models["diffusers bf16"]),
                                                         memory_format=torch.channels_last)
    f = vae.config.factor
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1 if what == "encode"
         else torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=g))
    outs, fns = {}, {}
    for name, m in models.items():
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        xi = x.to(device, dtype, memory_format=bench.MEMORY_FORMATS[bench.memory_format(m)])
        if name.startswith("latentctl"):  # as encode/decode run it (bench's own case)
            call = (lambda m=m, xi=xi: tiling.encode(m, xi, mode="off").mean) if what == "encode" else \
                   (lambda m=m, xi=xi: tiling.decode(m, xi, mode="off"))
        else:
            call = (lambda m=m, xi=xi: m.encode(xi).latent_dist.mean) if what == "encode" else \
                   (lambda m=m, xi=xi: m.decode(xi).sample)

        def keep_first(call=call, name=name):
            out = call()
            outs.setdefault(name, out.float().cpu())
            return out
        fns[name] = keep_first
    with torch.inference_mode():
        times, _ = alternated(fns, repeat, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = " ".join(f"{k} {1000 * med[k]:.0f} ms [{1000 * min(v):.0f}-{1000 * max(v):.0f}]" for k, v in times.items())
    row = dict(what=what, size=size, repeat=repeat, device=str(device), ms={k: round(1000 * v, 1) for k, v in med.items()},
               fp32_vs_diffusers_fp32=round(med["diffusers fp32"] / med["latentctl fp32"], 3),
               fp32_max_abs_diff=float((outs["latentctl fp32"] - outs["diffusers fp32"]).abs().max()))
    print(f"{what} {size}x{size}, medians of {repeat} rounds [min-max]: {spread}", flush=True)
    ok = row["fp32_vs_diffusers_fp32"] >= 1.25 and row["fp32_max_abs_diff"] <= 1e-4
    print(f"  latentctl fp32 / diffusers fp32: {row['fp32_vs_diffusers_fp32']:.2f}x, max diff "
          f"{row['fp32_max_abs_diff']:.1e} (target >= 1.25x, <= 1e-4: {'PASS' if ok else 'FAIL'}); "
          f"/ diffusers fp32 channels_last: {med['diffusers fp32 cl'] / med['latentctl fp32']:.2f}x (not a target)")
    row["fp32_vs_diffusers_fp32_channels_last"] = round(med["diffusers fp32 cl"] / med["latentctl fp32"], 3)
    if bf16:
        ref = outs["latentctl fp32"]
        rel = lambda k: float((outs[k] - ref).norm() / ref.norm())  # noqa: E731
        row.update(bf16_vs_diffusers_bf16=round(med["diffusers bf16"] / med["latentctl bf16"], 3),
                   bf16_vs_diffusers_fp32=round(med["diffusers fp32"] / med["latentctl bf16"], 3),
                   bf16_vs_fp32=round(med["latentctl fp32"] / med["latentctl bf16"], 3),
                   bf16_rel_l2_vs_fp32=round(rel("latentctl bf16"), 5),
                   diffusers_bf16_rel_l2_vs_fp32=round(rel("diffusers bf16"), 5))
        print(f"  latentctl bf16 / diffusers bf16-cast: {row['bf16_vs_diffusers_bf16']:.2f}x (target >= 1.2x: "
              f"{'PASS' if row['bf16_vs_diffusers_bf16'] >= 1.2 else 'FAIL'}); / diffusers fp32: "
              f"{row['bf16_vs_diffusers_fp32']:.2f}x (target >= 3x: {'PASS' if row['bf16_vs_diffusers_fp32'] >= 3 else 'FAIL'}); "
              f"/ latentctl fp32: {row['bf16_vs_fp32']:.2f}x; / diffusers bf16-cast channels_last: "
              f"{med['diffusers bf16 cl'] / med['latentctl bf16']:.2f}x (not a target)")
        row["bf16_vs_diffusers_bf16_channels_last"] = round(med["diffusers bf16 cl"] / med["latentctl bf16"], 3)
        print(f"  rel. L2 from latentctl fp32: latentctl bf16 {row['bf16_rel_l2_vs_fp32']:.1e}, diffusers bf16-cast "
              f"{row['diffusers_bf16_rel_l2_vs_fp32']:.1e} (random weights: quality on photos is in tests/test_bf16.py)")
    else:
        print("  bf16 not timed: this CPU has no bf16 kernels (--force-bf16 to time it anyway)")
    return row


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
