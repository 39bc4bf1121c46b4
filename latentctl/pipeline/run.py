"""encode / decode / roundtrip over many files.

Data flow: loader threads read and prepare each input -> the calling thread groups items of equal size into
batches and runs the model -> writer threads write each result atomically -> one Record per item, handed to
`report` (always from the calling thread). The library never prints: warnings go to `warn`; a `stop` Event
(the CLI sets it on Ctrl-C) ends the run after the batch in hand, once the writes in flight have finished.

All model compute goes through encode_batch() and decode_batch(), which tile (latentctl/tiling/) when asked
or when a batch would not fit in memory.
"""

import copy
import hashlib
import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__, buckets as bucketing, tiling
from ..errors import InputError, LatentctlError, Skip, UsageError
from ..metrics import psnr, ssim
from ..modules import AutoencoderKL, DiagonalGaussian, precision
from . import images, latents, outputs, provenance
from .inputs import IMAGE_EXTS, LATENT_EXTS, Item, assign_outputs, discover, resume_one
from .sinks import FileSink

STORES = ("mean", "sample", "posterior")
TILE_MODES = tiling.MODES


@dataclass
class Options:
    """Everything a run needs besides the model and the inputs (the CLI fills it from the flags)."""

    dtype: torch.dtype = torch.float32      # compute precision (autocast unless the weights are held in it)
    batch_size: int = 4
    workers: int = 4                        # loader threads, and as many writer threads
    store: str = "mean"                     # mean | sample | posterior
    seed: int | None = None                 # for store=sample; None: one is drawn and recorded in each file
    latent_dtype: str = "fp16"              # storage precision of latent files
    overwrite: bool = False
    verify_sources: bool = False            # resume: hash every source (default: only when size/mtime differ)
    fail_fast: bool = False
    max_pixels: int = 100_000_000
    alpha_background: tuple = (1.0, 1.0, 1.0)
    resize: int | None = None               # short side, before center_crop
    center_crop: tuple[int, int] | None = None
    image_format: str = "png"               # decode / roundtrip outputs: png | jpg | webp
    quality: int = 95
    key: str = "latent"                     # decode: the tensor to read
    scaling_factor: float | None = None     # decode: override the file's scale
    shift_factor: float | None = None       # decode: override the file's shift
    check_model: bool = True                # decode: refuse latents written by other weights
    tile: str = "auto"                      # auto | on | off  (see encode_batch)
    tile_size: int | None = None            # image pixels; None: the largest that fits
    max_memory: int | None = None           # bytes for activations; None: tiling's default budget
    spill: str | bool = True                # tiling's spill folder (True: the temp folder; False: none)
    buckets: bucketing.Buckets | None = None  # encode: resize + crop each image into its aspect bucket
    crop: str = "center"                    # with buckets: center | random (reproducible from the seed)
    too_small: str = "upscale"              # with buckets: upscale | skip an image smaller than its bucket
    flip: bool = False                      # with buckets: also store the mirrored crop's latent (`latent_flipped`)


@dataclass
class Record:
    """What happened to one input."""

    input: str
    output: str | None
    status: str                     # ok | skipped | error
    error: str | None = None
    shape: list[int] | None = None  # of what was written: latent (C, h, w) or image (3, H, W)
    seconds: float = 0.0            # this item's own load + share of its batch + write
    psnr: float | None = None       # roundtrip only
    ssim: float | None = None
    redone: str | None = None       # an existing output was made again: "source changed", "other dataset", ...
    item: Item | None = field(default=None, repr=False, compare=False)  # for sinks; not part of to_dict()

    def to_dict(self) -> dict:
        d = {"input": self.input, "output": self.output, "status": self.status, "error": self.error,
             "shape": self.shape, "seconds": round(self.seconds, 4)}
        if self.redone is not None:
            d["redone"] = self.redone
        if self.psnr is not None or self.ssim is not None:
            d["psnr"] = self.psnr if self.psnr is None or math.isfinite(self.psnr) else None  # inf: identical
            d["ssim"] = self.ssim
        return d


@dataclass
class Summary:
    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False       # `stop` was set before every item was done
    seed: int | None = None         # store=sample: the run's seed

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def count(self, record: "Record") -> None:
        self.ok += record.status == "ok"
        self.skipped += record.status == "skipped"
        self.failed += record.status == "error"


@dataclass
class _Job:
    item: Item
    key: tuple                      # items with equal keys are batched together
    x: torch.Tensor                 # model input: image (3, H, W) in [-1, 1] or raw latent (C, h, w)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0


# --- the two seams: every model call of the pipeline goes through one of these -------------------------------

def _autocast(vae: AutoencoderKL, options: Options):
    """Autocast only for float32 weights computing in bf16/fp16; weights held in the compute dtype
    (latentctl.load(dtype=...), what the CLI does for bf16) need no per-call casts."""
    device = next(vae.parameters()).device
    return torch.autocast(device.type, dtype=options.dtype, enabled=options.dtype != vae.dtype)


def _model_for(vae: AutoencoderKL, options: Options) -> AutoencoderKL:
    """vae, or, when fp32 is asked of weights held in bf16 (the redo after an overflow), an fp32 copy of it."""
    if options.dtype == torch.float32 and vae.dtype != torch.float32:
        return precision.hold(copy.deepcopy(vae), torch.float32)
    return vae


def encode_batch(vae: AutoencoderKL, x: torch.Tensor, options: Options) -> DiagonalGaussian:
    """Images (B, 3, H, W) in [-1, 1] -> posterior with float32 mean/logvar (B, C, h, w).
    Tiled when options.tile says so (auto: when the untiled batch would not fit options.max_memory)."""
    vae = _model_for(vae, options)
    with torch.inference_mode(), _autocast(vae, options):
        posterior = tiling.encode(vae, x, mode=options.tile, tile_size=options.tile_size, budget=options.max_memory,
                                  dtype=options.dtype, spill=options.spill)
    return DiagonalGaussian(torch.cat([posterior.mean.float(), posterior.logvar.float()], dim=1))


def decode_batch(vae: AutoencoderKL, z: torch.Tensor, options: Options) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> images (B, 3, H, W), float32, about [-1, 1] (not clamped). Tiled as encode_batch."""
    vae = _model_for(vae, options)
    with torch.inference_mode(), _autocast(vae, options):
        return tiling.decode(vae, z, mode=options.tile, tile_size=options.tile_size, budget=options.max_memory,
                             dtype=options.dtype, spill=options.spill).float()


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _guarded(fn, vae, x, options, warn, what: str):
    """fn(vae, x, options); if its result holds NaN/inf in reduced precision, the batch is redone in fp32."""
    out = fn(vae, x, options)
    tensors = (out.mean, out.logvar) if isinstance(out, DiagonalGaussian) else (out,)
    if options.dtype != torch.float32 and not _finite(*tensors):
        name = str(options.dtype).replace("torch.", "")
        warn(f"{what}: NaN/inf in {name} for a batch of {x.shape[0]} (overflow); redoing it in fp32")
        out = fn(vae, x, replace(options, dtype=torch.float32))
    return out


# --- planning ---------------------------------------------------------------------------------------------------

def plan(inputs, out_dir, exts, suffix, *, stdin_lines=None, root=None, keep_ext: bool = False, null: bool = False,
         also=None) -> list[Item]:
    """discover + assign_outputs + the checks made before any model is loaded: no output is an input file, the
    output folder can be created and written (UsageError otherwise). `also(output)`: further paths an item writes."""
    items = discover(inputs, exts, stdin_lines=stdin_lines, exclude=out_dir, root=root, null=null)
    if out_dir is None:
        return items  # roundtrip's metrics only: nothing is written
    items = assign_outputs(items, Path(out_dir), suffix, keep_ext=keep_ext, also=also)
    outputs.refuse_inputs_as_outputs([(i.path, [i.output, *(also(i.output) if also else [])])
                                      for i in items if i.output is not None and i.error is None])
    outputs.probe(Path(out_dir))
    return items


def plan_encode(inputs: list[str], out_dir: Path, stdin_lines=None, *, root=None, keep_ext: bool = False,
                null: bool = False) -> list[Item]:
    """Inputs -> items with their latent file paths (see pipeline/inputs.py for the mapping). Raises UsageError
    when an output would overwrite an input or the output folder cannot be created or written."""
    return plan(inputs, out_dir, IMAGE_EXTS, ".safetensors", stdin_lines=stdin_lines, root=root,
                 keep_ext=keep_ext, null=null)


def plan_decode(inputs: list[str], out_dir: Path, image_format: str = "png", stdin_lines=None, *, root=None,
                keep_ext: bool = False, null: bool = False) -> list[Item]:
    return plan(inputs, out_dir, LATENT_EXTS, "." + image_format, stdin_lines=stdin_lines, root=root,
                 keep_ext=keep_ext, null=null)


def plan_roundtrip(inputs: list[str], out_dir: Path | None, image_format: str = "png", stdin_lines=None, *,
                   root=None, keep_ext: bool = False, null: bool = False) -> list[Item]:
    return plan(inputs, out_dir, IMAGE_EXTS, "." + image_format, stdin_lines=stdin_lines, root=root,
                 keep_ext=keep_ext, null=null, also=lambda output: [compare_path(output)])


def compare_path(output: Path) -> Path:
    """Where roundtrip puts the side-by-side picture of `output`."""
    return output.with_name(output.stem + ".compare" + output.suffix)


# --- the driver shared by the three commands ------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _error(item: Item, message: str, seconds: float = 0.0) -> Record:
    return Record(item.source, str(item.output) if item.output else None, "error", message, seconds=seconds,
                  item=item)


def _ok(item: Item, shape, output: str | None = None, **extra) -> Record:
    """The Record of a written output (saying why, when it replaced an existing one)."""
    output = output if output is not None else str(item.output) if item.output else None
    return Record(item.source, output, "ok", shape=list(shape), redone=item.redo, item=item, **extra)


def _load(load, item: Item):
    """Run in a loader thread: a _Job, or the item's error Record. A bad file never raises out of here."""
    t = time.perf_counter()
    try:
        if item.error is not None:
            raise InputError(item.error)
        job = load(item)
    except InputError as e:
        return _error(item, str(e), time.perf_counter() - t)
    except Skip as e:
        return Record(item.source, str(item.output) if item.output else None, "skipped", str(e),
                      seconds=time.perf_counter() - t, item=item)
    except Exception as e:  # pillow and decoders raise many kinds on hostile files: all are the item's error
        return _error(item, f"{type(e).__name__}: {_first_line(e)}", time.perf_counter() - t)
    job.seconds = time.perf_counter() - t
    return job


def _finish(finish, job: _Job, result) -> Record:
    """Run in a writer thread: the item's Record (a failed write is the item's error, not the run's)."""
    t = time.perf_counter()
    try:
        record = finish(job, result)
    except InputError as e:
        record = _error(job.item, str(e))
    except OSError as e:
        record = _error(job.item, f"cannot write {job.item.output}: {e.strerror or e}")
    except Exception as e:
        record = _error(job.item, f"{type(e).__name__}: {_first_line(e)}")
    record.seconds = job.seconds + time.perf_counter() - t
    record.item = job.item
    return record


def _compute(compute, jobs: list[_Job]) -> list:
    """compute(jobs) -> one result or Exception per job. A batch that fails (e.g. out of memory) is retried
    one item at a time, so one bad item costs only itself."""
    try:
        return compute(jobs)
    except LatentctlError as e:
        if not isinstance(e, InputError):
            raise  # the model or the flags, not this item (e.g. a model the tiler cannot split): stop the run
        if len(jobs) == 1:
            return [e]
    except Exception as e:
        if len(jobs) == 1:
            return [e]
    return [_compute(compute, [job])[0] for job in jobs]


class _Threads:
    """A few daemon threads behind Futures. Unlike ThreadPoolExecutor they are not always joined: a stopped run
    (and the interpreter's exit) never waits for a load stuck in a slow read.

    A daemon thread still alive when the interpreter finalizes must not free a tensor: torch releases the GIL in
    the tensor's destructor, and a thread that asks for it back then is ended by pthread_exit, whose unwinding
    through torch's C++ aborts the process ("terminate called without an active exception", exit -6 after a
    finished run). So a worker drops each job's references before it takes the next, and `close` waits for the
    workers to end (at once when they are idle, as at the end of a run)."""

    def __init__(self, count: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)
            del job  # the inputs go here, while the run is alive, not when this thread is torn down

    @staticmethod
    def _run(future: Future, fn, args) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
                future.set_exception(e)

    def close(self, wait: float = 0.0) -> None:
        """End the workers once the queue is empty, and wait up to `wait` seconds for them to end."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _result(future: Future, halted):
    """future's result, or None as soon as halted() (checked every 0.1 s)."""
    while True:
        try:
            return future.result(timeout=0.1)
        except FutureTimeout:
            if halted():
                return None
def item_error(item_or_job, error) -> Record:
    """The error Record of an item (or a job) from a message or an exception."""
    item = getattr(item_or_job, "item", item_or_job)
    seconds = getattr(item_or_job, "seconds", 0.0)
    if isinstance(error, (str, InputError)):
        return _error(item, str(error), seconds)
    return _error(item, f"{type(error).__name__}: {_first_line(error)}", seconds)


load_item, compute_items, finish_item = _load, _compute, _finish  # the same per-item rules for other engines


def _drive(items: Iterable[Item], check, load, compute, finish, options: Options, report, stop,
           claims=None) -> Summary:
    """Every item once (from a list, or a generator that streams them: tar shards), through load -> compute -> finish. With `claims` (latentctl/dist/claims.py) each item is
    claimed before it is loaded, so runs sharing the output folder split the items; items another live run holds
    are done in later rounds, once free (or skipped, once that run has written them)."""
    if claims is None:
        return _drive_round(items, check, load, compute, finish, options, report, stop)
    started = time.perf_counter()
    summary, stop, rounds = Summary(total=len(items) if hasattr(items, "__len__") else 0), stop if stop is not None else threading.Event(), 0
    try:
        while items:
            before = claims.by_others
            part = _drive_round(items, check, load, compute, finish, options, report, stop, claims)
            if rounds:  # everything skipped in a later round was written by another run meanwhile
                claims.by_others = before + part.skipped
            rounds += 1
            summary.ok, summary.skipped, summary.failed = (summary.ok + part.ok, summary.skipped + part.skipped,
                                                           summary.failed + part.failed)
            items = claims.wait_deferred(lambda: stop.is_set() or (options.fail_fast and summary.failed > 0))
    finally:
        claims.close()
    summary.interrupted = stop.is_set() and summary.ok + summary.skipped + summary.failed < summary.total
    summary.seconds = time.perf_counter() - started
    return summary


def _drive_round(items: Iterable[Item], check, load, compute, finish, options: Options, report, stop,
                 claims=None) -> Summary:
    """Pull items one at a time, decide each one's resume state as it comes (check(item) -> (state, reason)),
    load, batch, compute and finish the ones to do."""
    started = time.perf_counter()
    sized = hasattr(items, "__len__")
    summary = Summary(total=len(items) if sized else 0)
    stop = stop if stop is not None else threading.Event()
    ended = []  # set once every item has been pulled

    def emit(record: Record) -> None:
        summary.count(record)
        if claims is not None and record.output is not None:
            claims.release(Path(record.output))  # after the write: the output is in place (or failed)
        if report is not None:
            report(record)

    def halted() -> bool:
        return stop.is_set() or (options.fail_fast and summary.failed > 0)

    if hasattr(items, "__len__"):  # a list (streamed shards clean their own temporaries)
        outputs.clean_stale_temps(sorted({i.output.parent for i in items if i.output is not None}))

    def triage():
        """The items to do, in order; skipped and refused ones are reported as they are met."""
        for item in items:
            summary.total += not sized
            state, reason = resume_one(item, options.overwrite, check)
            if state == "done":
                emit(Record(item.source, str(item.output), "skipped", item=item))
            elif state == "conflict":
                emit(_error(item, reason))
            else:
                yield item
            if halted():
                return
        ended.append(True)

    workers = max(1, options.workers)
    ahead = workers + 2 * options.batch_size    # items being loaded or waiting to be batched: bounds memory
    loader, writer = _Threads(workers, "latentctl-load"), _Threads(workers, "latentctl-write")
    pending, writes, buckets = deque(), deque(), {}
    if claims is None:
        source = triage()
    else:  # claims ask check(item) whether another run finished it meanwhile
        source = claims.take(triage(), check, options.overwrite,
                             lambda item: emit(Record(item.source, str(item.output), "skipped", item=item)))

    def fill() -> None:
        while len(pending) < ahead and not halted() and (item := next(source, None)) is not None:
            pending.append(loader.submit(_load, load, item))

    def drain(limit: int) -> None:
        """Report the finished writes; wait while more than `limit` are queued (bounds memory)."""
        while writes and (writes[0].done() or len(writes) > limit):
            emit(writes.popleft().result())

    def run(key) -> None:
        jobs = buckets.pop(key)
        t = time.perf_counter()
        results = _compute(compute, jobs)
        share = (time.perf_counter() - t) / len(jobs)
        for job, result in zip(jobs, results):
            job.seconds += share
            if isinstance(result, Exception):
                message = str(result) if isinstance(result, InputError) else \
                    f"{type(result).__name__}: {_first_line(result)}"
                emit(_error(job.item, message, job.seconds))
            else:
                writes.append(writer.submit(_finish, finish, job, result))
        drain(ahead)

    try:
        fill()
        while pending and not halted():
            job = _result(pending.popleft(), halted)
            if job is None:
                break
            fill()
            if isinstance(job, Record):
                emit(job)
                continue
            bucket = buckets.setdefault(job.key, [])
            bucket.append(job)
            if len(bucket) >= options.batch_size:
                run(job.key)
            elif sum(map(len, buckets.values())) > 2 * options.batch_size:
                run(max(buckets, key=lambda k: len(buckets[k])))  # many sizes: don't hold images forever
            drain(ahead)
        while buckets and not halted():
            run(next(iter(buckets)))
    finally:
        for future in pending:
            future.cancel()
        loader.close(wait=2.0)  # idle at a run's end; a halted run leaves a load stuck in a slow read behind
        drain(0)  # the writes in flight always finish, even after Ctrl-C (a second one abandons them)
        writer.close(wait=60.0)
    summary.interrupted = stop.is_set() and (not ended or summary.ok + summary.skipped + summary.failed < summary.total)
    summary.seconds = time.perf_counter() - started
    return summary


# --- encode ---------------------------------------------------------------------------------------------------

def load_image_job(item: Item, factor: int, options: Options, seed: int | None = None) -> _Job:
    """Read, decode and prepare one image (no model needed: a Ray read task calls it)."""
    if item.data is not None:  # a tar member
        data, source = item.data, provenance.of_bytes(item.data, item.source, item.rel.as_posix())
    else:
        data, source = provenance.read_source(item.path, item.rel.as_posix())
    item.data = None  # the decoded image is what is kept from here on
    loaded = images.read_image(data, max_pixels=options.max_pixels, alpha_background=options.alpha_background)
    info = {"loaded": loaded, "source": source}
    if options.buckets is None:
        x, info["geometry"] = images.prepare(loaded.rgb, factor=factor, resize=options.resize,
                                             center_crop=options.center_crop)
    else:  # aspect buckets: latentctl/buckets.py decides the size and the crop
        x, p = bucketing.prepare(loaded.rgb, options.buckets, crop=options.crop, too_small=options.too_small,
                                 seed=seed or 0, key=item.rel.as_posix())
        info["geometry"] = images.Geometry(*p.original, p.resized, p.box, (0, 0, *p.bucket), p.bucket)
        info["bucket"] = bucketing.metadata(p, options.flip)
    return _Job(item, tuple(x.shape), x, info)


def _item_seed(seed: int, item: Item, salt: str = "") -> int:
    """Each item's noise seed: from the run's seed and the item's relative path, so a sample does not
    depend on batching, order, device or which items a resumed run still had to do."""
    digest = hashlib.sha256(f"{seed}:{item.rel.as_posix()}{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _latent_tensors(vae, posterior: DiagonalGaussian, jobs: list[_Job], options: Options, seed, flipped=False) -> list:
    """Per job: {"latent": ..., ["mean", "logvar"]} in the storage dtype, or an InputError. flipped: the jobs'
    mirrored crops, in the second half of the batch; their tensors are named latent_flipped, ..."""
    storage = latents.STORAGE_DTYPES[options.latent_dtype]
    out = []
    for i, job in enumerate(jobs, len(jobs) if flipped else 0):
        mean, logvar = posterior.mean[i], posterior.logvar[i]
        z = mean
        if options.store == "sample":
            g = torch.Generator().manual_seed(_item_seed(seed, job.item, ":flipped" if flipped else ""))
            noise = torch.randn(mean.shape, generator=g)  # drawn on the CPU: the same numbers on any device
            z = mean + posterior.std[i] * noise.to(mean.device)
        tensors = {"latent": vae.normalize(z)}
        if options.store == "posterior":
            tensors |= {"mean": mean, "logvar": logvar}
        if not _finite(*tensors.values()):
            out.append(InputError("the model gives NaN/inf for this image even in fp32; not written"))
            continue
        stored = {k + ("_flipped" if flipped else ""): v.to(storage).cpu() for k, v in tensors.items()}
        if not _finite(*stored.values()):
            peak = max(v.abs().max().item() for v in tensors.values())
            out.append(InputError(f"latent values up to {peak:.4g} overflow {options.latent_dtype} storage; "
                                  "use --latent-dtype bf16 or fp32"))
            continue
        out.append(stored)
    return out


def _encode_settings(vae, info, options: Options, seed) -> dict[str, str]:
    """Metadata that must match for an existing file to count as done (see latents.check)."""
    s = {"weights_sha256": info.weights_sha256, "store": options.store, "latent_dtype": options.latent_dtype,
         "scaling_factor": repr(float(vae.config.scaling_factor)), "shift_factor": repr(float(vae.config.shift_factor)),
         "resize": str(options.resize or ""),
         "center_crop": "x".join(map(str, options.center_crop)) if options.center_crop else "",
         "alpha_background": images.color_hex(options.alpha_background)}
    if options.seed is not None and (options.store == "sample" or options.buckets and options.crop == "random"):
        s["seed"] = str(seed)
    s["buckets"] = options.buckets.spec if options.buckets else ""
    if options.buckets:
        s |= {"crop": options.crop, "flip": str(options.flip).lower()}
    return s


def _box(box) -> str:
    return ",".join(map(str, box)) if box else ""


def _metadata(job: _Job, vae, info, settings: dict, seed) -> dict[str, str]:
    g, loaded = job.info["geometry"], job.info["loaded"]
    return {**settings, "format": latents.FORMAT, "model": info.name, "weights": info.weights, "scaled": "true",
            "seed": str(seed) if seed is not None else "",
            "source": job.item.source, **job.info["source"].metadata(),
            "width": str(g.width), "height": str(g.height), "color_mode": loaded.mode,
            "exif_transposed": str(loaded.exif_transposed).lower(),
            "resized": "x".join(map(str, g.resized)) if g.resized else "", "crop_box": _box(g.crop),
            "valid_box": _box(g.valid), "padded": "x".join(map(str, g.padded)), "factor": str(vae.config.factor),
            "latentctl_version": __version__, **job.info.get("bucket", {})}


def check_options(options: Options) -> None:
    """Raise UsageError for values no run can use (the CLI calls this before loading the model)."""
    if options.store not in STORES:
        raise UsageError(f"--store {options.store!r}: choose {', '.join(STORES)}")
    if options.latent_dtype not in latents.STORAGE_DTYPES:
        raise UsageError(f"--latent-dtype {options.latent_dtype!r}: choose {', '.join(latents.STORAGE_DTYPES)}")
    if options.batch_size < 1 or options.workers < 1:
        raise UsageError("batch size and workers must be at least 1")
    if options.crop not in bucketing.CROPS or options.too_small not in bucketing.TOO_SMALL:
        raise UsageError(f"--crop {options.crop!r} / --too-small {options.too_small!r}: choose "
                         f"{' | '.join(bucketing.CROPS)} / {' | '.join(bucketing.TOO_SMALL)}")
    if options.buckets is None and options.flip:
        raise UsageError("--flip needs --buckets (it stores the mirrored bucket crop)")
    if options.buckets is not None and (options.resize or options.center_crop):
        raise UsageError("--buckets decides the size and crop itself: drop --resize/--center-crop")


def _run_seed(options: Options) -> int | None:
    """store=sample or random crops: the seed given, or a fresh one (recorded in every file, so any file can be
    remade)."""
    check_options(options)
    if options.store != "sample" and not (options.buckets and options.crop == "random"):
        return None
    return options.seed if options.seed is not None else secrets.randbits(63)


def latent_check(settings: dict[str, str], options: Options):
    """resume's check(item) for latent files: written with `settings` (else a conflict) from this very source
    (else redone, saying why: see provenance.judge)."""
    def check(item):
        try:
            meta, shapes = latents.read_metadata(item.output)
        except InputError:
            return "redo", "incomplete output"
        state, reason = latents.check_metadata(meta, shapes, settings)
        if state != "done":
            return state, reason
        if item.data is not None or item.key is not None:  # a tar sample: its shard's identity is the sink's
            return "done", ""
        same, why = provenance.judge(meta, item.path, item.rel.as_posix(), options.verify_sources)
        return ("done", "") if same else ("redo", why)

    return check


def _through(sink, items: Iterable[Item], report):
    """Items placed by the sink (it sets their outputs), and a report that tells the sink every record first."""
    def reported(record: Record) -> None:
        sink.record(record)
        if report is not None:
            report(record)
    return map(sink.place, items) if not hasattr(items, "__len__") else [sink.place(i) for i in items], reported


@dataclass
class Steps:
    """What a command does to one item, for any engine: check(item) -> resume state, load(item) -> _Job,
    compute(jobs) -> a result or Exception per job, finish(job, result) -> Record (writes through the sink)."""

    check: object
    load: object
    compute: object
    finish: object
    seed: int | None = None


def image_loader(factor: int, options: Options, seed=None):
    return lambda item: load_image_job(item, factor, options, seed)


def encode_steps(vae: AutoencoderKL, info, options: Options, sink, *, warn=None, seed=None) -> Steps:
    """encode's steps, writing through `sink` (opened here). seed: the run's seed for store=sample (None: the
    given one, or a fresh draw)."""
    warn = warn or (lambda message: None)
    if getattr(info, "settings", None) == "unknown":
        raise UsageError(f"{info.weights}: no latent scale known for these weights; load them with a model name "
                         "or scaling_factor= (and shift_factor=) before writing latents")
    seed = seed if seed is not None else _run_seed(options)
    settings = _encode_settings(vae, info, options, seed)
    weights = str(Path(info.weights).resolve()) if Path(info.weights).exists() else info.weights
    info = replace(info, weights=weights)  # recorded absolute, so decode finds it from any folder
    device = next(vae.parameters()).device
    if options.buckets is not None:
        bucketing.check_factor(options.buckets, vae.config.factor)

    def compute(jobs):
        x = torch.stack([j.x for j in jobs]).to(device)
        if options.flip:
            x = torch.cat([x, x.flip(-1)])  # the mirrored crops go through the model in the same batch
        posterior = _guarded(encode_batch, vae, x, options, warn, "encode")
        out = _latent_tensors(vae, posterior, jobs, options, seed)
        if options.flip:
            flips = _latent_tensors(vae, posterior, jobs, options, seed, flipped=True)
            out = [a if isinstance(a, Exception) else b if isinstance(b, Exception) else a | b
                   for a, b in zip(out, flips)]
        return out

    def finish(job, tensors):
        meta = _metadata(job, vae, info, settings, seed)
        shape = list(tensors["latent"].shape)
        where = sink.write(job.item, latents.to_bytes(tensors, meta),
                           {"shape": shape, "source": meta["source"], "source_sha256": meta["source_sha256"]})
        return _ok(job.item, shape, output=where)

    sink.open(settings, latent_check(settings, options))
    return Steps(sink.check, image_loader(vae.config.factor, options, seed), compute, finish, seed)


def encode_files(vae: AutoencoderKL, info, items: Iterable[Item], options: Options, *, report=None, warn=None,
                 stop: threading.Event | None = None, sink=None, claims=None) -> Summary:
    """Encode images to latents (items from plan_encode, or any iterable of Items: datasets.plan streams tar
    shards). `info` is api.load()'s ModelInfo. `sink` (sinks.py) says where they go: one file each by default."""
    sink = sink if sink is not None else FileSink(None)
    steps = encode_steps(vae, info, options, sink, warn=warn)
    items, report = _through(sink, items, report)
    summary = None
    try:
        summary = _drive(items, steps.check, steps.load, steps.compute, steps.finish, options, report, stop, claims)
    finally:
        sink.close(summary is None or summary.interrupted)
    summary.seed = steps.seed
    return summary


# --- decode ---------------------------------------------------------------------------------------------------

def _scale_shift(meta: dict, options: Options) -> tuple[float, float]:
    """The file's scale and shift, unless overridden; a file that does not say needs --scaling-factor."""
    ours = meta.get("format", "").startswith("latentctl-latent/")
    if ours and meta.get("format") != latents.FORMAT:
        raise InputError(f"latent file format {meta['format']!r} is newer than this latentctl ({latents.FORMAT})")
    if meta.get("scaled") == "false":
        scale, shift = 1.0, 0.0
    else:
        try:
            scale = float(meta["scaling_factor"]) if "scaling_factor" in meta else None
            shift = float(meta.get("shift_factor", "0") or 0)
        except ValueError:
            raise InputError("metadata scaling_factor/shift_factor are not numbers") from None
    scale = options.scaling_factor if options.scaling_factor is not None else scale
    shift = options.shift_factor if options.shift_factor is not None else shift
    if scale is None:
        raise InputError("the file does not say how its latent was scaled: pass --scaling-factor "
                         "(and --shift-factor) as used when it was written")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"scaling_factor {scale!r} is not a finite positive number; pass --scaling-factor")
    if not math.isfinite(shift):
        raise InputError(f"shift_factor {shift!r} is not a finite number; pass --shift-factor")
    return scale, shift


def _load_latent_job(item: Item, vae: AutoencoderKL, info, options: Options) -> _Job:
    if item.data is not None:  # a tar member
        data, source = item.data, provenance.of_bytes(item.data, item.source, item.rel.as_posix())
    else:
        data, source = provenance.read_source(item.path, item.rel.as_posix())
    item.data = None
    latent, meta = latents.parse(data, options.key)
    if not latent.is_floating_point():
        raise InputError(f"tensor {options.key!r} holds {str(latent.dtype).replace('torch.', '')} values; "
                         "a latent is floating point")
    latent = latent.float()
    if not _finite(latent):
        raise InputError(f"the file stores NaN/inf in tensor {options.key!r}; nothing to decode")
    channels = vae.config.latent_channels
    if latent.shape[0] != channels:
        raise InputError(f"latent has {latent.shape[0]} channels; model {info.name!r} takes {channels}")
    if meta.get("factor") and meta["factor"] != str(vae.config.factor):
        raise InputError(f"latent was made by a model with factor {meta['factor']}; "
                         f"model {info.name!r} has factor {vae.config.factor}")
    sha = meta.get("weights_sha256")
    if options.check_model and sha and sha != info.weights_sha256:
        raise InputError(f"written by model {meta.get('model')!r} (weights sha256 {sha[:12]}…), not by "
                         f"{info.name!r} ({info.weights_sha256[:12]}…); pass --model/--weights to decode it anyway")
    scale, shift = _scale_shift(meta, options)
    z = latent / scale + shift  # model-ready latent -> raw latent
    h, w = z.shape[1] * vae.config.factor, z.shape[2] * vae.config.factor
    valid = (0, 0, w, h)
    if meta.get("valid_box"):
        try:
            valid = tuple(int(v) for v in meta["valid_box"].split(","))
        except ValueError:
            raise InputError(f"metadata valid_box {meta['valid_box']!r} is not 'left,top,right,bottom'") from None
        if len(valid) != 4 or not (0 <= valid[0] < valid[2] <= w and 0 <= valid[1] < valid[3] <= h):
            raise InputError(f"metadata valid_box {meta['valid_box']!r} does not fit a {w}x{h} image")
    if not _finite(z):
        raise InputError(f"NaN/inf after unscaling (scaling_factor {scale!r}, shift_factor {shift!r})")
    return _Job(item, tuple(z.shape), z, {"valid": valid, "source": source})


def _crop(image: torch.Tensor, box) -> torch.Tensor:
    left, top, right, bottom = box
    return image[:, top:bottom, left:right]


def _decoded(vae, z: torch.Tensor, options: Options, warn) -> list:
    images_ = _guarded(decode_batch, vae, z, options, warn, "decode").cpu()
    return [img if _finite(img) else InputError("the model gives NaN/inf for this latent even in fp32 "
                                                "(the latent in the file is finite)")
            for img in images_]


def _write_image(path: Path, rgb: np.ndarray, options: Options, record: dict | None = None) -> None:
    latents.atomic_write(path, images.encode_image(rgb, options.image_format, options.quality, record=record))


DECODED = "latentctl-decoded/1"


def _decode_settings(info, options: Options) -> dict[str, str]:
    """What a decoded image recorded must match for it to count as done."""
    return {"weights_sha256": info.weights_sha256, "key": options.key, "quality": str(options.quality),
            "scaling_factor": "" if options.scaling_factor is None else repr(options.scaling_factor),
            "shift_factor": "" if options.shift_factor is None else repr(options.shift_factor)}


def decode_files(vae: AutoencoderKL, info, items: Iterable[Item], options: Options, *, report=None, warn=None,
                 stop: threading.Event | None = None, sink=None, claims=None) -> Summary:
    """Decode latents to images cropped to their valid box (items from plan_decode, or latent shards through
    datasets.plan). `sink`: where the images go (one file each)."""
    warn = warn or (lambda message: None)
    device = next(vae.parameters()).device

    def compute(jobs):
        return _decoded(vae, torch.stack([j.x for j in jobs]).to(device), options, warn)

    settings = _decode_settings(info, options)

    def finish(job, image):
        rgb = images.to_uint8(_crop(image, job.info["valid"]))
        data = images.encode_image(rgb, options.image_format, options.quality,
                                   record={"format": DECODED, **settings, **job.info["source"].metadata()})
        return _ok(job.item, [3, *rgb.shape[:2]], output=sink.write(job.item, data))

    def check(item):
        recorded = images.read_record(item.output)
        if recorded is None:
            return "redo", "incomplete output"
        if recorded.get("format") != DECODED:
            return "redo", "no record of its source"
        if any(recorded.get(k) != v for k, v in settings.items()):
            return "redo", "settings changed"
        same, why = provenance.judge(recorded, item.path, item.rel.as_posix(), options.verify_sources)
        return ("done", "") if same else ("redo", why)

    sink = sink if sink is not None else FileSink(None, "." + options.image_format)
    sink.open({}, check)
    items, report = _through(sink, items, report)
    summary = None
    try:
        summary = _drive(items, sink.check, lambda item: _load_latent_job(item, vae, info, options), compute,
                         finish, options, report, stop, claims)
    finally:
        sink.close(summary is None or summary.interrupted)
    return summary


# --- roundtrip ------------------------------------------------------------------------------------------------

def roundtrip_files(vae: AutoencoderKL, info, items: list[Item], options: Options, *, report=None, warn=None,
                    stop: threading.Event | None = None) -> Summary:
    """Encode then decode in memory, exactly as `encode` then `decode` would (same storage dtype and scaling);
    each Record carries PSNR and SSIM of the 8-bit reconstruction against the image that was encoded.
    With outputs (plan_roundtrip with a folder) it writes the reconstruction and original | reconstruction | error."""
    warn = warn or (lambda message: None)
    seed = _run_seed(options)
    device = next(vae.parameters()).device
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor)

    def compute(jobs):
        x = torch.stack([j.x for j in jobs]).to(device)
        posterior = _guarded(encode_batch, vae, x, options, warn, "encode")
        stored = _latent_tensors(vae, posterior, jobs, options, seed)
        ok = [i for i, s in enumerate(stored) if not isinstance(s, Exception)]
        if ok:
            # the same arithmetic decode does on a file: stored dtype -> float32, then unscale
            z = torch.stack([stored[i]["latent"].float() / scale + shift for i in ok]).to(device)
            for i, image in zip(ok, _decoded(vae, z, options, warn)):
                stored[i] = image
        return stored

    def finish(job, image):
        box = job.info["geometry"].valid
        recon = images.to_uint8(_crop(image, box))
        original = images.to_uint8(_crop(job.x, box))
        if job.info["loaded"].mode.startswith(("I", "F")) or job.info["loaded"].mode.endswith(";16"):  # 16-bit/float: compare against full precision
            reference = _crop(job.x, box).add(1).div(2).clamp(0, 1)
        else:
            reference = torch.from_numpy(original).permute(2, 0, 1).float() / 255
        got = torch.from_numpy(recon).permute(2, 0, 1).float() / 255
        try:
            s = ssim(reference, got)
        except ValueError:  # smaller than the 11x11 window
            s = None
        if job.item.output is not None:
            _write_image(job.item.output, recon, options)
            _write_image(compare_path(job.item.output), images.side_by_side(original, recon), options)
        return _ok(job.item, [3, *recon.shape[:2]], psnr=psnr(reference, got), ssim=s)

    summary = _drive(items, None, image_loader(vae.config.factor, options), compute, finish,
                     options, report, stop)
    summary.seed = seed
    return summary
