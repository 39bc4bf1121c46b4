"""One prepared CUDA run (for a lent GPU): xformers vs sdpa agreement, then images/s and roofline fraction.

    python benchmarks/gpu_check.py [--sizes 512,1024] [--repeat 5] [--budget-s 150]

1. If xformers can run: the SD mid-block attention (4096 tokens x 512 channels) in fp16 through sdpa and
   xformers, each against an fp32 reference; xformers passes if its error is within fp16 tolerance, i.e.
   no more than twice sdpa's own fp16 error (+1e-3). Also a whole fp16 decode at 512x512 both ways.
2. SD-VAE architecture at full width, random weights (speed and FLOPs do not depend on the values):
   encode and decode at each size, bf16 and fp16, sdpa and xformers, contiguous and channels_last,
   through latentctl.bench (the code behind `latentctl bench`). Batch 8 at 512, 2 at 1024.
   Roofline fraction = achieved FLOP/s (latentctl.flops count, 2 per multiply-add) / 790 TFLOP/s, the
   bf16 dense matmul rate measured on an H200 here.
3. The batching target: bf16 encode at 512, batch 1 and 4 timed in alternation (performance.py's code).
4. torch.compile against eager, bf16 at 512 batch 8 (fusing GroupNorm, swish and the adds is where a GPU,
   unlike a CPU, could gain), unless the run is past --extra-budget-s.
Prints a compact table; writes JSON to $OUT/gpu_check.json when OUT is set (after every row, so a run
cut short keeps what it measured). Stops starting new cases after --budget-s seconds.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import latentctl  # noqa: E402
from latentctl import bench  # noqa: E402
from latentctl.errors import BackendUnavailable  # noqa: E402
from latentctl.modules.attention import check_backend, sdpa_attention, xformers_attention  # noqa: E402
from performance import batch_images_per_s, compiled_vs_eager  # noqa: E402  (this folder: sys.path[0])

ROOFLINE = 790e12
BATCH = {512: 8, 1024: 2}


def agreement(vae, report: dict) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    # q, k scaled so the logits have unit spread, as in a trained block (raw randn would make softmax one-hot)
    q, k, v = (torch.randn(2, 4096, 512, device="cuda", generator=g) for _ in range(3))
    q, k = q * 512**-0.25, k * 512**-0.25
    ref = sdpa_attention(q, k, v)  # fp32
    half = [t.half() for t in (q, k, v)]
    err_sdpa = (sdpa_attention(*half).float() - ref).abs().max().item()
    err_xf = (xformers_attention(*half).float() - ref).abs().max().item()
    m = bench.prepare(vae, torch.float16)
    z = torch.randn(1, 4, 64, 64, device="cuda", generator=g).half()
    with torch.inference_mode():
        m.set_attn_backend("sdpa")
        a = m.decode(z).float()
        m.set_attn_backend("xformers")
        b = m.decode(z).float()
    report["agreement"] = {
        "attention_fp16_max_err_vs_fp32": {"sdpa": err_sdpa, "xformers": err_xf},
        "attention_pass": err_xf <= 2 * err_sdpa + 1e-3,
        "decode_512_fp16_max_abs_diff_xformers_vs_sdpa": (a - b).abs().max().item(),
        "decode_output_range": (a.min().item(), a.max().item())}
    print("agreement:", json.dumps(report["agreement"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    ap.add_argument("--extra-budget-s", type=float, default=300.0,
                    help="start neither the batching nor the torch.compile part after this many seconds")
    args = ap.parse_args()
    t0 = time.time()
    out_dir = os.environ.get("OUT")
    out_path = Path(out_dir) / "gpu_check.json" if out_dir else None
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolution per shape
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn_benchmark": True,
              "roofline_tflops": ROOFLINE / 1e12, "rows": []}
    attns = ["sdpa"]
    try:
        check_backend("xformers", "cuda")
        import xformers

        report["xformers"] = xformers.__version__
        attns.append("xformers")
    except BackendUnavailable as e:
        report["xformers"] = f"unavailable: {e}"
    print(f"{report['device']}, torch {report['torch']}, xformers {report['xformers']}", flush=True)

    def save():
        report["seconds"] = round(time.time() - t0, 1)
        if out_path is not None:
            out_path.write_text(json.dumps(report, indent=1))

    vae, _ = latentctl.load("sd15", random_weights=True, device="cuda")
    if "xformers" in attns:
        agreement(vae, report)
        save()
    print(f"{'what':6} {'size':>4} {'b':>2} {'dtype':5} {'format':13} {'attn':8} {'img/s':>8} {'ms/img':>7} "
          f"{'TFLOP/s':>7} {'roofline':>8} {'peak GB':>7}", flush=True)
    for size in [int(s) for s in args.sizes.split(",")]:
        for fmt in ("channels_last", "contiguous"):
            for what in ("encode", "decode"):
                if time.time() - t0 > args.budget_s:
                    report["cut_short"] = f"stopped before {what} {size} {fmt}: over --budget-s"
                    break
                rows = bench.run(vae, whats=(what,), attns=attns, dtypes=("bf16", "fp16"), sizes=(size,),
                                 batches=(BATCH.get(size, 1),), memory_formats=(fmt,), repeat=args.repeat,
                                 model_name="sd15")
                for r in rows:
                    if r["status"] == "ok":
                        r["roofline_fraction"] = round(r["gflops"] * 1e9 / ROOFLINE, 3)
                        print(f"{what:6} {size:>4} {r['batch']:>2} {r['dtype']:5} {r['memory_format']:13} "
                              f"{r['attn']:8} {r['images_per_s']:8.1f} {r['ms_per_image']:7.2f} "
                              f"{r['gflops'] / 1e3:7.1f} {r['roofline_fraction']:8.1%} "
                              f"{r['peak_mem_mb'] / 1024:7.1f}", flush=True)
                    else:
                        print(f"{what:6} {size:>4} {r['status']}: {r['reason']}", flush=True)
                report["rows"] += rows
                save()
    bf16 = bench.prepare(vae, torch.bfloat16)
    if time.time() - t0 < args.extra_budget_s:
        with torch.inference_mode():
            ips = batch_images_per_s(bf16, 512, (1, 4), args.repeat)
        report["batching_encode_512_bf16"] = {"batch1_images_per_s": ips[1], "batch4_images_per_s": ips[4]}
        print(f"batching: encode 512 bf16 images/s batch 4 = {ips[4]:.1f}, batch 1 = {ips[1]:.1f}", flush=True)
        save()
    if time.time() - t0 < args.extra_budget_s:
        with torch.no_grad():  # not inference_mode: tensors made there cannot be saved for compiled graphs
            report["compile"] = compiled_vs_eager(bf16, 512, args.repeat, batch=BATCH[512])
    save()
    print(f"gpu_check: {report['seconds']} s" + (f" -> {out_path}" if out_path else ""), flush=True)


if __name__ == "__main__":
    main()
