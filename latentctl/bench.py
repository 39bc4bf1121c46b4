"""Timing the autoencoder: images/s, peak memory, achieved GFLOP/s, and diffusers on the same weights.

One warm-up, then `repeat` timed runs; the median and the min-max are reported per image. Memory is the
peak resident set of the process on CPU (sampled by a thread from /proc/self/statm, so each case and each
model gets its own peak), or torch's max allocated on CUDA. With `vs_diffusers`, diffusers' AutoencoderKL
is built from our config, given the same weights, and run interleaved with ours in the same process, so
both see the same machine load; `vs_diffusers` on a row is diffusers' time / ours (above 1: we are faster).
Ours runs as `encode`/`decode` run it, untiled (tiling.encode/decode with mode off: a batch image by image on a CPU).

No printing: `run` returns the rows and hands each to `on_row` as it is measured.
"""

import copy
import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Callable

import torch

from . import tiling
from .api import cpu_has_fast_bf16, resolve_dtype
from .checkpoints import diffusers_to_ldm
from .errors import BackendUnavailable, LatentctlError, UsageError
from .flops import WHATS, model_flops
from .modules import AutoencoderKL, precision
from .modules.attention import check_backend

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Every row has these keys (None where they do not apply); `status` is ok | unavailable | error.
# peak_mem_mb: the process's peak during the calls (weights, torch itself and, with vs_diffusers, both models);
# act_mem_mb: the peak above the level just before each call (activations and workspace: what a batch costs).
# gflops is achieved GFLOP/s (nominal FLOPs of the model, see flops.py); vs_diffusers is diffusers' time / ours.
ROW_KEYS = ("what", "attn", "dtype", "size", "batch", "status", "images_per_s", "ms_per_image", "ms_per_image_min",
            "ms_per_image_max", "peak_mem_mb", "act_mem_mb", "gflop_per_image", "gflops", "vs_diffusers",
            "diffusers_images_per_s", "diffusers_peak_mem_mb", "diffusers_max_abs_diff", "memory_format",
            "device", "threads", "repeat", "model", "reason")
MB = 2**20


# ---- memory ----------------------------------------------------------------------------------------

def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_memory() -> None:
    """Give freed heap back to the OS, so one case's leftovers do not count as the next one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: peaks may then include memory an earlier case freed


class RssPeak:
    """Peak RSS since the last `reset()`, sampled every `interval` s by a daemon thread (and at reset/read)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._lock = threading.Lock()  # a sample read before reset() must not land after it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._note()

    def _note(self) -> None:
        with self._lock:
            rss = _rss_bytes()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def __enter__(self):
        if self.start is not None:  # no /proc here: report no memory rather than a wrong one
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def reset(self) -> None:
        with self._lock:
            self.start = self.peak = _rss_bytes()

    def read(self) -> tuple[int | None, int | None]:
        """(peak, level at reset) in bytes."""
        self._note()
        return self.peak, self.start


class CudaPeak:
    """The same interface over torch's allocator statistics (exact, no sampling)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)

    def read(self) -> tuple[int, int]:
        return torch.cuda.max_memory_allocated(self.device), self.start


# ---- diffusers on the same weights -------------------------------------------------------------------

def ldm_to_diffusers(sd: dict[str, torch.Tensor], target: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the diffusers keys in `target` (name -> shape): the inverse of diffusers_to_ldm.

    Built from the loader's own table: each diffusers name is sent through diffusers_to_ldm with its index
    as the value, which says which of our tensors it is; attention weights are reshaped [C, C, 1, 1] -> [C, C].
    """
    names = list(target)
    tags = diffusers_to_ldm({name: torch.tensor([i]) for i, name in enumerate(names)})
    missing = sorted(set(tags) - set(sd))
    extra = sorted(set(sd) - set(tags))
    if missing or extra:
        raise UsageError(f"--vs diffusers: our weights do not map onto diffusers' AutoencoderKL "
                         f"(missing {missing[:3]}, unmapped {extra[:3]})")
    return {names[int(tag)]: sd[key].reshape(target[names[int(tag)]]) for key, tag in tags.items()}


def diffusers_twin(vae: AutoencoderKL) -> torch.nn.Module:
    """diffusers' AutoencoderKL with our architecture and a copy of our weights, in eval mode on our device."""
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError:
        raise UsageError("--vs diffusers: diffusers is not installed (pip install diffusers)") from None
    c = vae.config
    if c.mid_attn == "linear" or c.attn_resolutions or c.embed_dim != c.z_channels or c.decoder_norm != "group":
        raise UsageError("--vs diffusers: diffusers' AutoencoderKL has no equivalent of this architecture "
                         "(linear-attention layout, attention inside the levels, embed_dim != z_channels, or "
                         "decoder norms with fixed statistics)")
    levels = len(c.ch_mult)
    with torch.device("meta"):  # no random init of weights that are replaced at once
        twin = DiffusersAutoencoderKL(
            in_channels=c.in_channels, out_channels=c.out_ch, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(c.ch * m for m in c.ch_mult),
            layers_per_block=c.num_res_blocks, latent_channels=c.z_channels, use_quant_conv=c.use_quant_conv,
            use_post_quant_conv=c.use_post_quant_conv, mid_block_add_attention=c.mid_attn == "vanilla")
    target = {k: v.shape for k, v in twin.state_dict().items()}
    # NCHW copies whatever our layout: diffusers as people load it (assign=True would keep channels_last strides)
    weights = ldm_to_diffusers({k: v.detach().clone(memory_format=torch.contiguous_format)
                                for k, v in vae.state_dict().items()}, target)
    twin.load_state_dict(weights, strict=True, assign=True)
    return twin.eval().requires_grad_(False)


# ---- timing ------------------------------------------------------------------------------------------

def memory_format(model: torch.nn.Module) -> str:
    """channels_last if the model's convolution weights are stored that way, else contiguous."""
    for p in model.parameters():
        if p.ndim == 4 and p.shape[-1] > 1:
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return "channels_last" if cl else "contiguous"
    return "contiguous"


def auto_format(vae: AutoencoderKL, dtype: torch.dtype) -> str:
    """The layout latentctl.load(dtype=...) gives on this device: on a CPU precision.cpu_layout (NCHW for fp32 with
    NNPACK, else channels_last), elsewhere the layout the model is in."""
    if next(vae.parameters()).device.type == "cpu":
        return "channels_last" if precision.cpu_layout(dtype) == torch.channels_last else "contiguous"
    return memory_format(vae)


def measure(fns: dict[str, Callable], repeat: int, device: torch.device, meter) -> tuple[dict, float | None]:
    """Warm each fn up once, then time them `repeat` times, interleaved (the order alternates every round).

    Returns per fn {"times", "peak", "act"} (act: peak above the level before the call), and the largest
    difference between the first two fns' warm-up outputs (None for one fn).
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    res = {name: {"times": [], "peak": None, "act": None} for name in fns}

    def call(name, timed: bool):
        _release_free_memory()
        meter.reset()
        sync()
        t0 = time.perf_counter()
        out = fns[name]()
        sync()
        dt = time.perf_counter() - t0
        peak, start = meter.read()
        r = res[name]
        if timed:
            r["times"].append(dt)
        if peak is not None:
            r["peak"] = max(r["peak"] or 0, peak)
            r["act"] = max(r["act"] or 0, peak - start)
        return out

    names = list(fns)
    outs = [call(name, timed=False) for name in names]
    diff = float((outs[0].float() - outs[1].float()).abs().max()) if len(outs) > 1 else None
    del outs  # kept outputs would sit in every later measurement
    for i in range(repeat):
        for name in names if i % 2 == 0 else names[::-1]:
            call(name, timed=True)
    return res, diff


def memory_meter(device: torch.device):
    """The peak-memory meter `measure` reads on this device (a context manager)."""
    return CudaPeak(device) if device.type == "cuda" else RssPeak()


def _row(**values) -> dict:
    return {key: values.get(key) for key in ROW_KEYS}


def prepare(model: torch.nn.Module, dtype: torch.dtype, fmt: str = "contiguous") -> torch.nn.Module:
    """The model at `dtype` and memory format: a copy unless unchanged, so the fp32 weights stay exact for the next."""
    if dtype == torch.float32 and memory_format(model) == fmt:
        return model
    # nn.Module.to: diffusers' own .to() logs advice to stderr, and the library never prints
    model = torch.nn.Module.to(copy.deepcopy(model), memory_format=MEMORY_FORMATS[fmt])
    if isinstance(model, AutoencoderKL):  # ours as latentctl.load(dtype=...) holds it (GroupNorm affines fp32 on CPU)
        return precision.hold(model, dtype, MEMORY_FORMATS[fmt])
    return torch.nn.Module.to(model, dtype=dtype)  # diffusers as a user casts it


def run(vae: AutoencoderKL, *, whats=WHATS, attns=("sdpa",), dtypes=("auto",), sizes=(256,), batches=(1,),
        memory_formats=("auto",), repeat: int = 3, vs_diffusers: bool = False, model_name: str = "",
        seed: int = 0, on_row: Callable[[dict], None] | None = None,
        on_warning: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark every (dtype, memory format, attn, what, size, batch) on the model's device; one row each.

    A backend or dtype that cannot run here gives one `unavailable` row with the reason and is skipped;
    a case that fails (out of memory, say) gives an `error` row and the others go on.
    """
    device = next(vae.parameters()).device
    cfg = vae.config
    bad = [w for w in whats if w not in WHATS]
    if bad:
        raise UsageError(f"--what {bad[0]!r}: choose from {', '.join(WHATS)}")
    for s in sizes:
        if s <= 0 or s % cfg.factor:
            raise UsageError(f"--size {s}: must be a positive multiple of {cfg.factor} (the model's factor)")
    bad = [f for f in memory_formats if f != "auto" and f not in MEMORY_FORMATS]
    if bad:
        raise UsageError(f"--memory-format {bad[0]!r}: choose from auto, {', '.join(MEMORY_FORMATS)}")
    if repeat < 1 or any(b < 1 for b in batches):
        raise UsageError("--repeat and --batch must be at least 1")
    rows: list[dict] = []
    backend_before = cfg.attn_backend
    common = dict(device=str(device), threads=torch.get_num_threads(), repeat=repeat, model=model_name)

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    ok_attns = []
    for a in attns:
        try:
            check_backend(a, device)
            ok_attns.append(a)
        except BackendUnavailable as e:
            emit(_row(attn=a, status="unavailable", reason=str(e), **common))
    ok_dtypes = []
    for d in dtypes:
        try:
            dt = resolve_dtype(d, device)
        except LatentctlError as e:
            emit(_row(dtype=d, status="unavailable", reason=str(e), **common))
            continue
        if dt not in ok_dtypes:
            ok_dtypes.append(dt)
    twin = diffusers_twin(vae) if vs_diffusers and ok_attns and ok_dtypes else None

    if torch.bfloat16 in ok_dtypes and device.type == "cpu" and not cpu_has_fast_bf16() and on_warning:
        on_warning("bf16 on this CPU has no fast kernels (no AVX-512 BF16/AMX): convolutions run ~100x "
                   "slower than fp32; expect a long run")
    # auto: the layout encode/decode run in at that dtype (auto_format); each layout once per dtype
    cases = [(dt, auto_format(vae, dt) if f == "auto" else f) for dt in ok_dtypes for f in memory_formats]
    for dt, fmt in dict.fromkeys(cases):
        ours = prepare(vae, dt, fmt)
        theirs = prepare(twin, dt, fmt) if twin is not None else None
        for a in ok_attns:
            ours.set_attn_backend(a)
            for what in whats:
                for size in sizes:
                    for batch in batches:
                        emit(_case(ours, theirs, what, a, dt, fmt, size, batch, repeat, seed, common))
        del ours, theirs
        _release_free_memory()
    vae.set_attn_backend(backend_before)
    return rows


def _case(ours, theirs, what, attn, dtype, fmt, size, batch, repeat, seed, common) -> dict:
    cfg = ours.config
    device = torch.device(common["device"])
    g = torch.Generator().manual_seed(seed)
    if what == "encode":
        x = torch.rand(batch, cfg.in_channels, size, size, generator=g) * 2 - 1  # an image in [-1, 1]
        fns = {"ours": lambda: tiling.encode(ours, x, mode="off").mean}
        if theirs is not None:
            fns["diffusers"] = lambda: theirs.encode(x).latent_dist.mean
    else:
        x = torch.randn(batch, cfg.latent_channels, size // cfg.factor, size // cfg.factor, generator=g)
        fns = {"ours": lambda: tiling.decode(ours, x, mode="off")}
        if theirs is not None:
            fns["diffusers"] = lambda: theirs.decode(x).sample
    x = x.to(device, dtype, memory_format=MEMORY_FORMATS[fmt])  # the lambdas above read x when called
    flop = model_flops(cfg, what, size, attn)
    base = dict(what=what, attn=attn, dtype=DTYPE_NAMES[dtype], size=size, batch=batch,
                memory_format=memory_format(ours), gflop_per_image=round(flop / 1e9, 3), **common)
    meter = memory_meter(device)
    try:
        with torch.inference_mode(), meter:
            res, diff = measure(fns, repeat, device, meter)
    except (RuntimeError, MemoryError) as e:  # out of memory and kernel failures: a record, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return _row(status="error", reason=f"{type(e).__name__}: {first}", **base)
    mine = res["ours"]
    med = statistics.median(mine["times"])
    row = _row(status="ok", images_per_s=round(batch / med, 3), ms_per_image=round(1000 * med / batch, 2),
               ms_per_image_min=round(1000 * min(mine["times"]) / batch, 2),
               ms_per_image_max=round(1000 * max(mine["times"]) / batch, 2),
               peak_mem_mb=_mb(mine["peak"]), act_mem_mb=_mb(mine["act"]),
               gflops=round(flop * batch / med / 1e9, 1), **base)
    if "diffusers" in res:
        theirs_med = statistics.median(res["diffusers"]["times"])
        row.update(vs_diffusers=round(theirs_med / med, 3), diffusers_images_per_s=round(batch / theirs_med, 3),
                   diffusers_peak_mem_mb=_mb(res["diffusers"]["peak"]), diffusers_max_abs_diff=diff)
    return row


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / MB, 1)
