"""`latentctl encode`, `decode`, `roundtrip`: check the flags, build Options, call latentctl.pipeline, print.

Results go to stdout (JSON lines with --json, the roundtrip table); `error: PATH: reason`, warnings, the
progress bar (only on a terminal) and the summary line go to stderr.
Exit: 0 all ok; 1 some inputs failed; 2 usage/model/weights error; 130 Ctrl-C (143 SIGTERM) after the writes
in flight finished.
"""

import functools
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from .. import api, buckets as bucketing, interrupts
from ..modules import precision
from ..errors import InputError, UsageError
from ..pipeline import by_model, datasets, images, media, run
from ..pipeline.clip_writers import CLIP_FORMATS
from ..pipeline.frames import Selection
from ..pipeline.inputs import split_paths
from ..dist.claims import Claims
from . import options as opt
from . import output, scale

Inputs = typer.Argument(..., help="Files, folders (walked recursively), glob patterns, or - for paths on stdin, "
                                  "one per line (NUL-separated with -0); or WebDataset tar shards: .tar files, a "
                                  "folder of them (an img2dataset output folder as it is), globs, or brace ranges "
                                  "s/{00000..00099}.tar.")


def _size_bytes(text: str | None) -> int | None:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise UsageError(f"--max-memory {text!r}: expected a size such as 8G or 512M")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _spill(spill_dir: str | None) -> str | bool:
    if spill_dir is None:
        return True
    if spill_dir.lower() == "none":
        return False
    if not Path(spill_dir).is_dir():
        raise UsageError(f"--spill-dir {spill_dir}: not a folder")
    return spill_dir


def _options(*, device, dtype, batch_size, workers, tile, tile_size, max_memory, spill_dir, fail_fast,
             **extra) -> run.Options:
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if tile not in run.TILE_MODES:
        raise UsageError(f"--tile {tile!r}: choose {', '.join(run.TILE_MODES)}")
    if tile_size is not None and tile_size < 8:
        raise UsageError(f"--tile-size {tile_size}: must be at least 8 pixels")
    return run.Options(dtype=api.resolve_dtype(dtype, api.resolve_device(device)), batch_size=batch_size,
                       workers=workers or min(8, os.cpu_count() or 1), tile=tile, tile_size=tile_size,
                       max_memory=_size_bytes(max_memory), spill=_spill(spill_dir), fail_fast=fail_fast, **extra)


def _image_options(*, store, seed, latent_dtype, resize, center_crop, alpha_background, max_pixels,
                   crop="center") -> dict:
    if resize is not None and resize < 1:
        raise UsageError(f"--resize {resize}: must be at least 1")
    if max_pixels < 1:
        raise UsageError(f"--max-pixels {max_pixels}: must be at least 1")
    if seed is not None and store != "sample" and crop != "random":
        raise UsageError(f"--seed is for --store sample or --crop random (this run stores {store})")
    return dict(store=store, seed=seed, latent_dtype=latent_dtype, resize=resize,
                center_crop=images.parse_size(center_crop, "--center-crop") if center_crop else None,
                alpha_background=images.parse_color(alpha_background), max_pixels=max_pixels)


def _bucket_options(*, buckets, crop, too_small, flip) -> dict:
    if buckets is None and (crop != "center" or too_small != "upscale" or flip):
        raise UsageError("--crop, --too-small and --flip go with --buckets")
    return dict(buckets=bucketing.parse(buckets) if buckets else None, crop=crop, too_small=too_small, flip=flip)


def _format(image_format: str | None, quality: int) -> dict:
    """Options for images; --format mp4/gif is kept as asked (image inputs then fail one by one)."""
    choices = dict.fromkeys([*images.FORMATS, *CLIP_FORMATS])
    if image_format is not None and image_format not in choices:
        raise UsageError(f"--format {image_format!r}: choose {', '.join(choices)}")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality {quality}: must be 1-100")
    return dict(image_format=image_format or "png", quality=quality)


def _clip_format(image_format: str | None) -> str:
    return image_format or "mp4"


def _selection(frame_step, fps, max_frames, start, end) -> Selection:
    selection = Selection(frame_step=frame_step, fps=fps, max_frames=max_frames, start=start, end=end)
    selection.check()
    return selection


def _paths(inputs: list[str], root: str | None, keep_ext: bool, null: bool) -> dict:
    """The planning arguments shared by the three commands (see pipeline/inputs.py for the path mapping)."""
    stdin_lines = None
    if "-" in inputs:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("'-' reads paths from stdin, but stdin is a terminal (pipe a list of paths in)")
        buffer = getattr(sys.stdin, "buffer", None)
        text = os.fsdecode(buffer.read()) if buffer is not None else sys.stdin.read()
        stdin_lines = split_paths(text, null)
    elif null:
        raise UsageError("-0/--null is for paths on stdin: add - to the inputs")
    if root is not None and not Path(root).is_dir():
        raise UsageError(f"--root {root}: not a folder")
    return dict(stdin_lines=stdin_lines, root=root, keep_ext=keep_ext, null=True)


def _check_scale(scale: float | None, flag: str) -> None:
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"{flag} {scale}: must be a positive finite number")


def _load_model(model, weights, models, device, attn, download, **kw):
    vae, info = api.load(model, weights=weights, device=device, attn=attn, models_file=models, download=download, **kw)
    if vae.config.in_channels != 3 or vae.config.out_ch != 3:
        raise UsageError(f"model {info.name!r} takes {vae.config.in_channels}-channel images; the pipeline needs RGB")
    return vae, info


def _execute(verb: str, fn, vae, info, items, options: run.Options, json: bool, quiet: bool, rank=None,
             progress=None, **extra) -> None:
    """Run fn (encode_files, ...) with the progress bar, error lines and JSON records; exit with the right code.
    With a rank of several (cli/scale.py) `items` is that rank's part, possibly empty; `progress` (a
    dist.progress.ProgressWriter) gets every record; `extra` goes to fn."""
    if not items and (rank is None or rank.count == 1):
        raise UsageError("no input files found")
    # bf16: the weights are held in bf16 (no autocast casts per call; GroupNorm affines stay fp32 on CPU)
    if vae is not None:   # None: fn loads its models itself (decode per file) and holds them so
        vae = precision.hold(vae, precision.weights_dtype(options.dtype))
    stop = threading.Event()
    interrupts_ = interrupts.during_run(stop)  # first SIGINT/SIGTERM: stop after the writes in flight
    caught = interrupts_.__enter__()
    records, closed = [], []
    bar = output.progress(len(items) if hasattr(items, "__len__") else None, verb, quiet)

    def report(record: run.Record) -> None:
        if progress is not None:
            progress.add(record)
        if record.status == "error":
            output.error(f"{record.input}: {record.error}")
        elif record.status == "skipped" and record.error:  # skipped on purpose, with the reason (never silent)
            output.warning(f"{record.input}: skipped: {record.error}")
        if json and not closed:
            try:
                output.json_line(record.to_dict())
            except BrokenPipeError:  # `latentctl encode --json ... | head`: nobody reads on; stop like a pipe does
                closed.append(True)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                stop.set()
        if verb == "roundtrip":
            records.append(record)
        if bar is not None:
            bar.advance(bar.task_ids[0])

    try:
        if bar is not None:
            bar.start()
        summary = None
        summary = fn(vae, info, items, options, report=report, warn=output.warning, stop=stop, **extra)
    finally:
        if progress is not None:
            progress.close(finished=summary is not None and not summary.interrupted)
        if bar is not None:
            bar.stop()
        interrupts_.__exit__(None, None, None)
    if verb == "roundtrip" and not json:
        _roundtrip_table(records)
    seed = f", seed {summary.seed}" if summary.seed is not None else ""
    who = f"rank {rank.label}: " if rank is not None and rank.count > 1 else ""
    output.info(f"{who}{verb}: {summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed of {summary.total} "
                f"in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s{seed})", quiet)
    if closed:
        raise typer.Exit(128 + signal.SIGPIPE)
    if summary.interrupted or caught:
        output.warning(f"interrupted after {summary.ok + summary.skipped + summary.failed} of {summary.total}; "
                       "rerun the same command to do the rest")
        raise typer.Exit(130 if not caught or caught[0] == signal.SIGINT else 128 + caught[0])
    raise typer.Exit(1 if summary.failed else 0)


def _roundtrip_table(records: list[run.Record]) -> None:
    ok = [r for r in records if r.status == "ok"]
    rows = [[r.input, f"{r.psnr:.2f}", "-" if r.ssim is None else f"{r.ssim:.4f}", f"{r.seconds:.2f}"] for r in ok]
    if ok:
        finite = [r.psnr for r in ok if r.psnr != float("inf")]
        ssims = [r.ssim for r in ok if r.ssim is not None]
        rows.append(["mean", f"{sum(finite) / len(finite):.2f}" if finite else "inf",
                     f"{sum(ssims) / len(ssims):.4f}" if ssims else "-", f"{sum(r.seconds for r in ok) / len(ok):.2f}"])
    output.table("roundtrip", ["input", "psnr (dB)", "ssim", "seconds"], rows)
    clips = [r for r in ok if getattr(r, "frames", None) is not None]
    if clips:  # per clip: psnr/ssim above are means over its frames
        output.table("roundtrip clips", ["clip", "frames", "fps", "min psnr (dB)", "min ssim", "flicker"],
                     [[r.input, str(r.frames), f"{r.fps:.3g}", f"{r.psnr_min:.2f}",
                       "-" if r.ssim_min is None else f"{r.ssim_min:.4f}", f"{r.flicker:.5f}"] for r in clips])


def encode(inputs: list[str] = Inputs,
           out: Path = typer.Option(..., "--output", "-o", help="Folder for the latent files (mirrors the inputs)."),
           model: Optional[str] = opt.Model, weights: Optional[Path] = opt.Weights,
           models: Optional[Path] = opt.ModelsFile, scaling_factor: Optional[float] = opt.ScalingFactor,
           shift_factor: Optional[float] = opt.ShiftFactor, device: str = opt.Device, dtype: str = opt.Dtype,
           attn: str = opt.Attn, download: bool = opt.Download, batch_size: int = opt.BatchSize,
           workers: Optional[int] = opt.Workers, store: str = opt.Store, seed: Optional[int] = opt.Seed,
           latent_dtype: str = opt.LatentDtype, resize: Optional[int] = opt.Resize,
           center_crop: Optional[str] = opt.CenterCrop, alpha_background: str = opt.AlphaBackground,
           max_pixels: int = opt.MaxPixels, buckets: Optional[str] = opt.Buckets, crop: str = opt.Crop,
           too_small: str = opt.TooSmall, flip: bool = opt.Flip, overwrite: bool = opt.Overwrite,
           verify_sources: bool = opt.VerifySources, keep_ext: bool = opt.KeepExt, root: Optional[str] = opt.Root,
           null: bool = opt.Null, fail_fast: bool = opt.FailFast,
           tile: str = opt.Tile, tile_size: Optional[int] = opt.TileSize, max_memory: Optional[str] = opt.MaxMemory,
           spill_dir: Optional[str] = opt.SpillDir, frame_step: int = opt.FrameStep, fps: Optional[float] = opt.Fps,
           max_frames: Optional[int] = opt.MaxFrames, start: float = opt.Start, end: Optional[float] = opt.End,
           json: bool = opt.Json, quiet: bool = opt.Quiet,
           to: str = typer.Option("files", "--to", help="files: one .safetensors per image or clip (default) | wds: "
                                  "WebDataset tar shards of image latents, one per input shard (same name) or "
                                  "--shard-size images each, with NAME_stats.json written last."),
           shard_size: Optional[int] = typer.Option(None, "--shard-size", help="--to wds from loose files: images "
                                                    f"per output shard (default {datasets.DEFAULT_SHARD_SIZE})."),
           shard: Optional[str] = opt.Shard, shard_by: str = opt.ShardBy, engine: str = opt.Engine,
           ray_address: Optional[str] = opt.RayAddress):
    """Encode images and clips to latent .safetensors files (one per image or clip; a clip's `latent` is
    (T, C, h, w)), or images to WebDataset shards (--to wds); complete outputs are skipped on a rerun.
    OUT/index.parquet lists every image latent."""
    # the latent scale first: weights that nobody gave a scale for are refused before any work
    _check_scale(scaling_factor, "--scaling-factor")
    api.weights_settings(model, weights=weights, models_file=models, download=download,
                         scaling_factor=scaling_factor, shift_factor=shift_factor).require_scale()
    rank, device = scale.setup(shard, shard_by, device)
    fn, engine_args = scale.engine(engine, ray_address)
    options = _options(device=device, dtype=dtype, batch_size=batch_size, workers=workers, tile=tile,
                       tile_size=tile_size, max_memory=max_memory, spill_dir=spill_dir, fail_fast=fail_fast,
                       overwrite=overwrite, verify_sources=verify_sources,
                       **_image_options(store=store, seed=seed, latent_dtype=latent_dtype, resize=resize,
                                        center_crop=center_crop, alpha_background=alpha_background,
                                        max_pixels=max_pixels, crop=crop),
                       **_bucket_options(buckets=buckets, crop=crop, too_small=too_small, flip=flip))
    run.check_options(options)
    selection = _selection(frame_step, fps, max_frames, start, end)
    paths = _paths(inputs, root, keep_ext, null)
    planned = []  # how many items the whole job has (every rank's part)
    items, sink = datasets.plan_encode(inputs, out, to=to, shard_size=shard_size, overwrite=overwrite,
                                       part=scale.counted(planned, rank, shard_by), **paths)
    vae, info = _load_model(model, weights, models, device, attn, download,
                            scaling_factor=scaling_factor, shift_factor=shift_factor)
    if fn is not None:  # --engine ray: image files to latent files
        scale.check_engine_items(items, to)
        _execute("encode", fn, vae, info, items, options, json, quiet, rank,
                 scale.progress(out, rank, planned, items, None), sink=sink, **engine_args)
    elif isinstance(items, list):  # loose files: images and clips, each item claimed (runs may share OUT)
        claims = Claims()
        _execute("encode", functools.partial(media.encode_files, selection=selection), vae, info, items, options,
                 json, quiet, rank, scale.progress(out, rank, planned, items, claims), claims=claims, sink=sink)
    else:  # streamed shards, or shards out: ranks split whole shards
        _execute("encode", run.encode_files, vae, info, items, options, json, quiet, rank, sink=sink)


def decode(inputs: list[str] = Inputs,
           out: Path = typer.Option(..., "--output", "-o", help="Folder for the images (mirrors the inputs)."),
           model: Optional[str] = typer.Option(None, "--model", "-m", help="Decode every file with this model "
                                               "(default: each file's own, found from what it records)."),
           weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Weights for files whose recorded "
                                                  "weights are not on this machine (with --model: that model's)."), models: Optional[Path] = opt.ModelsFile,
           device: str = opt.Device, dtype: str = opt.Dtype, attn: str = opt.Attn, download: bool = opt.Download,
           key: str = typer.Option("latent", "--key", help="Tensor to decode (for files from other tools)."),
           scaling_factor: Optional[float] = typer.Option(None, "--scaling-factor", help="Scale the latents were "
                                                          "multiplied by (default: from the file's metadata)."),
           shift_factor: Optional[float] = typer.Option(None, "--shift-factor", help="Shift subtracted before scaling "
                                                        "(default: from the metadata, else 0)."),
           image_format: Optional[str] = opt.ImageFormat, quality: int = opt.Quality, batch_size: int = opt.BatchSize,
           workers: Optional[int] = opt.Workers, overwrite: bool = opt.Overwrite,
           verify_sources: bool = opt.VerifySources, keep_ext: bool = opt.KeepExt, root: Optional[str] = opt.Root,
           null: bool = opt.Null, fail_fast: bool = opt.FailFast,
           tile: str = opt.Tile, tile_size: Optional[int] = opt.TileSize, max_memory: Optional[str] = opt.MaxMemory,
           spill_dir: Optional[str] = opt.SpillDir, json: bool = opt.Json, quiet: bool = opt.Quiet,
           shard: Optional[str] = opt.Shard, shard_by: str = opt.ShardBy):
    """Decode latent files to images, cropped back to the original size (model, scale, shift from each file's
    metadata; files by several models decode in one run, each model loaded once); a clip's file to a video at its
    recorded fps (or a folder of frames with --format png/jpg)."""
    rank, device = scale.setup(shard, shard_by, device)
    options = _options(device=device, dtype=dtype, batch_size=batch_size, workers=workers, tile=tile,
                       tile_size=tile_size, max_memory=max_memory, spill_dir=spill_dir, fail_fast=fail_fast,
                       overwrite=overwrite, verify_sources=verify_sources,
                       key=key, scaling_factor=scaling_factor, shift_factor=shift_factor,
                       check_model=model is None, **_format(image_format, quality))
    _check_scale(scaling_factor, "--scaling-factor")
    if shift_factor is not None and not math.isfinite(shift_factor):
        raise UsageError(f"--shift-factor {shift_factor}: must be a finite number")
    paths = _paths(inputs, root, keep_ext, null)
    stdin_lines = paths["stdin_lines"]
    planned = []  # how many items the whole job has
    items, sink = datasets.plan_decode(inputs, out, image_format=options.image_format,
                                       clip_format=_clip_format(image_format),
                                       part=scale.counted(planned, rank, shard_by), **paths)
    if not isinstance(items, list):  # latent shards: one model for the stream, the one its first sample records
        if model is None:
            meta = datasets.first_latent_metadata(inputs, stdin_lines) or {}
            try:
                choice = by_model.choose(meta, fallback=weights, models_file=models)
            except InputError as e:
                raise UsageError(f"the first latent of the shards: {e}") from None
            model, weights = choice.model, choice.weights
        vae, info = _load_model(model, weights, models, device, attn, download)
        _execute("decode", run.decode_files, vae, info, items, options, json, quiet, rank, sink=sink)
        return
    decode_files = functools.partial(media.decode_files, clip_format=_clip_format(image_format))
    claims = Claims()
    progress = scale.progress(out, rank, planned, items, claims)
    if model is not None:   # one named model for every file, whatever they record
        vae, info = _load_model(model, weights, models, device, attn, download)
        _execute("decode", decode_files, vae, info, items, options, json, quiet, rank, progress, claims=claims,
                 sink=sink)
        return

    def load(name, path):
        vae, info = _load_model(name, path, models, device, attn, download)
        return precision.hold(vae, precision.weights_dtype(options.dtype)), info

    def per_file(vae, info, items, options, **kw):
        return by_model.decode_by_model(items, options, load, decode=decode_files, fallback=weights,
                                        models_file=models, **kw)

    _execute("decode", per_file, None, None, items, options, json, quiet, rank, progress, claims=claims, sink=sink)


def roundtrip(inputs: list[str] = Inputs,
              out: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write each reconstruction and "
                                                 "NAME.compare.png: original | reconstruction | error heat-map "
                                                 f"(white = mean abs error >= {images.HEAT_FULL_SCALE:g})."),
              model: Optional[str] = opt.Model, weights: Optional[Path] = opt.Weights,
              models: Optional[Path] = opt.ModelsFile, device: str = opt.Device, dtype: str = opt.Dtype,
              attn: str = opt.Attn, download: bool = opt.Download, batch_size: int = opt.BatchSize,
              workers: Optional[int] = opt.Workers, store: str = opt.Store, seed: Optional[int] = opt.Seed,
              latent_dtype: str = opt.LatentDtype, resize: Optional[int] = opt.Resize,
              center_crop: Optional[str] = opt.CenterCrop, alpha_background: str = opt.AlphaBackground,
              max_pixels: int = opt.MaxPixels, image_format: Optional[str] = opt.ImageFormat, quality: int = opt.Quality,
              keep_ext: bool = opt.KeepExt, root: Optional[str] = opt.Root, null: bool = opt.Null,
              fail_fast: bool = opt.FailFast, tile: str = opt.Tile, tile_size: Optional[int] = opt.TileSize,
              max_memory: Optional[str] = opt.MaxMemory, spill_dir: Optional[str] = opt.SpillDir,
              frame_step: int = opt.FrameStep, fps: Optional[float] = opt.Fps,
              max_frames: Optional[int] = opt.MaxFrames, start: float = opt.Start, end: Optional[float] = opt.End,
              json: bool = opt.Json, quiet: bool = opt.Quiet):
    """Encode then decode in memory: PSNR and SSIM per image and their mean (a table, or JSON lines); per clip
    the mean and worst frame and the flicker (mean change of the error between consecutive frames)."""
    options = _options(device=device, dtype=dtype, batch_size=batch_size, workers=workers, tile=tile,
                       tile_size=tile_size, max_memory=max_memory, spill_dir=spill_dir, fail_fast=fail_fast,
                       overwrite=True,
                       **_format(image_format, quality),
                       **_image_options(store=store, seed=seed, latent_dtype=latent_dtype, resize=resize,
                                        center_crop=center_crop, alpha_background=alpha_background,
                                        max_pixels=max_pixels))
    run.check_options(options)
    selection = _selection(frame_step, fps, max_frames, start, end)
    items = media.plan_roundtrip(inputs, out, options.image_format, _clip_format(image_format),
                                 **_paths(inputs, root, keep_ext, null))
    vae, info = _load_model(model, weights, models, device, attn, download)
    _execute("roundtrip", functools.partial(media.roundtrip_files, selection=selection,
                                            clip_format=_clip_format(image_format)),
             vae, info, items, options, json, quiet)
