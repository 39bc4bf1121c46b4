"""encode / decode / roundtrip of clips (videos, animated GIF/WebP/PNG), one clip after another, each streamed
in batches of frames: frames.py reads and selects, run.py's encode_batch/decode_batch compute (the same
seams, tiling, precision and NaN guard as images), spooled.py assembles one latent file per clip,
clip_writers.py writes decoded clips.

A clip's latent file is a latentctl latent file whose `latent` is (T, C, h, w): frame t is exactly what
encoding that frame as an image gives. Metadata adds kind=clip, frames, fps (of the encoded frames),
timestamps and frame_indices (in the source), source_fps, and the frame selection (see frames.Selection).
"""

import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .. import buckets as bucketing
from ..errors import InputError, LatentctlError, Skip
from ..metrics import psnr, ssim
from . import images, latents, provenance, run
from .clip_writers import ClipWriter, clip_output, compare_output, is_complete
from .frames import FrameReader, Selection
from .inputs import Item, resume
from .spooled import Spool

KIND = "clip"


@dataclass
class ClipRecord(run.Record):
    """A clip's Record: psnr/ssim are means over its frames; roundtrip adds the worst frame and flicker."""

    frames: int | None = None
    fps: float | None = None
    psnr_min: float | None = None
    ssim_min: float | None = None
    flicker: float | None = None    # mean |error(t) - error(t-1)| over pixels and consecutive frames, [0, 1] units

    def to_dict(self) -> dict:
        d = super().to_dict()
        d |= {"kind": KIND, "frames": self.frames, "fps": self.fps}
        if self.psnr is not None:
            d |= {"psnr_min": self.psnr_min if self.psnr_min is None or np.isfinite(self.psnr_min) else None,
                  "ssim_min": self.ssim_min, "flicker": self.flicker}
        return d


def _frame_item(item: Item, index: int) -> Item:
    """Frame `index` of a clip as an item of its own: --store sample draws its noise from this path."""
    return replace(item, rel=PurePosixPath(f"{item.rel.as_posix()}#{index}"))


def _device(vae) -> torch.device:
    return next(vae.parameters()).device


def _prepare(batch, vae, item: Item, options: run.Options, seed, geometry):
    """Frames (index, t, rgb) -> model input (B, 3, H, W), the clip's Geometry and bucket metadata (the same for
    every frame: as run.py prepares an image, with the clip's path as the random crop's key)."""
    xs, bucket = [], {}
    for index, _, rgb in batch:
        if options.buckets is None:
            x, g = images.prepare(rgb, factor=vae.config.factor, resize=options.resize,
                                  center_crop=options.center_crop)
        else:
            x, p = bucketing.prepare(rgb, options.buckets, crop=options.crop, too_small=options.too_small,
                                     seed=seed or 0, key=item.rel.as_posix())
            g = images.Geometry(*p.original, p.resized, p.box, (0, 0, *p.bucket), p.bucket)
            bucket = bucketing.metadata(p, options.flip)
        if geometry is not None and g != geometry:
            raise InputError(f"frame {index} gives a {g.padded} model input; the clip's first frame {geometry.padded}")
        geometry = g
        xs.append(x)
    return torch.stack(xs), geometry, bucket


def _stored(vae, x, batch, item, options, seed, warn) -> list[dict]:
    """Encode a batch of frames: per frame {"latent", ["mean", "logvar"]} in the storage dtype, with --flip also
    the mirrored frames' latent_flipped, ... (run.py's code)."""
    x = x.to(_device(vae))
    if options.flip:
        x = torch.cat([x, x.flip(-1)])  # the mirrored crops go through the model in the same batch
    posterior = run._guarded(run.encode_batch, vae, x, options, warn, "encode")
    jobs = [run._Job(_frame_item(item, index), (), None) for index, _, _ in batch]
    stored = run._latent_tensors(vae, posterior, jobs, options, seed)
    if options.flip:
        flips = run._latent_tensors(vae, posterior, jobs, options, seed, flipped=True)
        stored = [a if isinstance(a, Exception) else b if isinstance(b, Exception) else a | b
                  for a, b in zip(stored, flips)]
    for (index, _, _), s in zip(batch, stored):
        if isinstance(s, Exception):
            raise InputError(f"frame {index}: {s}")
    return stored


def _no_frames(reader: FrameReader) -> InputError:
    if reader.info.frames_read == 0:
        return InputError("no frames in this clip (zero-frame or empty video stream)")
    return InputError(f"no frame selected: the clip has {reader.info.frames_read} frames at "
                      f"{reader.info.source_fps:.3g} fps; check --start/--end")


def _clip_fps(reader: FrameReader, selection: Selection, warn, source: str) -> float:
    """The rate of the encoded frames: the source's, over --frame-step, or --fps (at most the source's)."""
    fps = reader.info.source_fps
    if selection.fps is not None:
        if selection.fps > fps * (1 + 1e-6):
            warn(f"{source}: --fps {selection.fps:g} is above the clip's {fps:.3g} fps; every frame kept, at "
                 f"{fps:.3g} fps (frames are never repeated)")
            return fps
        return float(selection.fps)
    return fps / selection.frame_step


def _guard(item: Item, work) -> run.Record:
    """work() -> Record; a bad clip becomes its error Record (one line), never an exception out of the run."""
    t = time.perf_counter()
    try:
        record = work()
    except InputError as e:
        record = run._error(item, str(e))
    except Skip as e:  # on purpose (--too-small skip), with the reason
        record = run.Record(item.source, str(item.output) if item.output else None, "skipped", str(e))
    except LatentctlError:
        raise  # the model or the flags, not this clip: stop the run
    except OSError as e:
        record = run._error(item, f"cannot write {item.output}: {e.strerror or e}")
    except Exception as e:  # decoders raise many kinds on hostile files: all are the clip's error
        record = run._error(item, f"{type(e).__name__}: {run._first_line(e)}")
    if record is not None:
        record.seconds = time.perf_counter() - t
    return record


def _drive(items: list[Item], check, work, options: run.Options, report, stop, claims=None) -> run.Summary:
    """Clips one after another: resume check, work(item) -> Record or None (stopped), records, summary.
    With `claims` (latentctl/dist/claims.py), as run.py: each clip is claimed before it is read, so runs sharing
    the output folder split the clips; clips another live run holds are looked at again once free."""
    started = time.perf_counter()
    summary = run.Summary(total=len(items))

    def emit(record: run.Record) -> None:
        summary.count(record)
        if claims is not None and record.output is not None:
            claims.release(Path(record.output))  # after the write: the output is in place (or failed)
        if report is not None:
            report(record)

    def halted() -> bool:
        return stop.is_set() or (options.fail_fast and summary.failed > 0)

    try:
        while items:
            todo, done, refused = resume(items, options.overwrite, check) if check else (items, [], [])
            for item in done:
                emit(run.Record(item.source, str(item.output), "skipped"))
            for item, reason in refused:
                emit(run._error(item, reason))
            if claims is not None:
                todo = claims.take(todo, check, options.overwrite,
                                   lambda item: emit(run.Record(item.source, str(item.output), "skipped")))
            for item in todo:
                if halted():
                    break
                if item.error is not None:
                    emit(run._error(item, item.error))
                    continue
                record = _guard(item, lambda: work(item))
                if record is None:  # stopped mid-clip: nothing was written for it
                    if claims is not None:
                        claims.release(item.output)
                    break
                emit(record)
            items = claims.wait_deferred(halted) if claims is not None else []
    finally:
        if claims is not None:
            claims.close()
    summary.interrupted = stop.is_set() and summary.ok + summary.skipped + summary.failed < summary.total
    summary.seconds = time.perf_counter() - started
    return summary


# --- encode ---------------------------------------------------------------------------------------------------

def clip_settings(vae, info, options: run.Options, seed, selection: Selection) -> dict[str, str]:
    return {**run._encode_settings(vae, info, options, seed), **selection.settings()}


def encode_clips(vae, info, items: list[Item], options: run.Options, selection: Selection = Selection(), *,
                 seed=None, report=None, warn=None, stop: threading.Event | None = None, claims=None) -> run.Summary:
    """Encode clips (items with latent-file outputs) to one latent file each. `seed`: store=sample's run seed
    (None: drawn here, as run.encode_files does)."""
    warn = warn or (lambda message: None)
    stop = stop if stop is not None else threading.Event()
    selection.check()
    seed = seed if seed is not None else run._run_seed(options)
    settings = clip_settings(vae, info, options, seed, selection)
    weights = str(Path(info.weights).resolve()) if Path(info.weights).exists() else info.weights
    info = replace(info, weights=weights)
    if options.buckets is not None:
        bucketing.check_factor(options.buckets, vae.config.factor)

    def work(item: Item):
        with FrameReader(item.path, max_pixels=options.max_pixels, alpha_background=options.alpha_background) \
                as reader, Spool(item.output.parent) as spool:
            geometry, indices, stamps = None, [], []
            for batch in reader.batches(selection, options.batch_size):
                if stop.is_set():
                    return None
                x, geometry, bucket = _prepare(batch, vae, item, options, seed, geometry)
                stored = _stored(vae, x, batch, item, options, seed, warn)
                spool.append({k: torch.stack([s[k] for s in stored]) for k in stored[0]})
                indices += [index for index, _, _ in batch]
                stamps += [t for _, t, _ in batch]
            if not spool.frames:
                raise _no_frames(reader)
            fps = _clip_fps(reader, selection, warn, item.source)
            mode = "RGB" if reader.info.reader == "pyav" else "RGBA"
            job = run._Job(item, (), None, {"geometry": geometry, "bucket": bucket,
                                            "source": provenance.identify(item.path, item.rel.as_posix()),
                                            "loaded": images.Loaded(None, mode, False, mode == "RGBA")})
            meta = run._metadata(job, vae, info, settings, seed) | {
                "kind": KIND, "frames": str(spool.frames), "fps": repr(fps),
                "timestamps": json.dumps([round(t, 6) for t in stamps]), "frame_indices": json.dumps(indices),
                "source_fps": repr(reader.info.source_fps), "reader": reader.info.reader, "codec": reader.info.codec}
            spool.write(item.output, meta)
            return ClipRecord(item.source, str(item.output), "ok", shape=[spool.frames, *stored[0]["latent"].shape],
                              frames=spool.frames, fps=fps)

    summary = _drive(items, run.latent_check(settings, options), work, options, report, stop, claims)
    summary.seed = seed
    return summary


# --- decode ---------------------------------------------------------------------------------------------------

def is_clip_latent(path: Path) -> bool:
    """A latent file written by encode_clips (from its header); anything unreadable is left to the image path."""
    try:
        meta, _ = latents.read_metadata(path)
    except Exception:  # unreadable: the image decode path reports it
        return False
    return meta.get("kind") == KIND


@dataclass
class _Clip:
    """A clip latent file, checked, ready to decode."""

    frames: int
    fps: float
    timestamps: list[float]
    scale: float
    shift: float
    valid: tuple[int, int, int, int]


def _open_clip_latent(path: Path, vae, info, options: run.Options) -> _Clip:
    meta, shapes = latents.read_metadata(path)
    shape = shapes.get(options.key)
    if shape is None:
        raise InputError(f"no tensor {options.key!r} in this file (it has {', '.join(shapes) or 'none'})")
    if len(shape) != 4:
        raise InputError(f"tensor {options.key!r} has shape {tuple(shape)}; a clip's is (T, C, h, w)")
    t, c, h, w = shape
    if c != vae.config.latent_channels:
        raise InputError(f"latent has {c} channels; model {info.name!r} takes {vae.config.latent_channels}")
    if meta.get("factor") and meta["factor"] != str(vae.config.factor):
        raise InputError(f"latent was made by a model with factor {meta['factor']}; "
                         f"model {info.name!r} has factor {vae.config.factor}")
    sha = meta.get("weights_sha256")
    if options.check_model and sha and sha != info.weights_sha256:
        raise InputError(f"written by model {meta.get('model')!r} (weights sha256 {sha[:12]}…), not by "
                         f"{info.name!r} ({info.weights_sha256[:12]}…); pass --model/--weights to decode it anyway")
    scale, shift = run._scale_shift(meta, options)
    try:
        fps = float(meta["fps"])
        stamps = [float(v) for v in json.loads(meta.get("timestamps") or "[]")]
        valid = tuple(int(v) for v in meta["valid_box"].split(","))
    except (KeyError, ValueError, TypeError):
        raise InputError("clip metadata fps/timestamps/valid_box missing or malformed") from None
    W, H = w * vae.config.factor, h * vae.config.factor
    if not fps > 0 or len(valid) != 4 or not (0 <= valid[0] < valid[2] <= W and 0 <= valid[1] < valid[3] <= H):
        raise InputError(f"clip metadata fps {meta['fps']!r} / valid_box {meta['valid_box']!r} do not fit")
    return _Clip(t, fps, stamps if len(stamps) == t else [k / fps for k in range(t)], scale, shift, valid)


def _decode_frames(vae, z: torch.Tensor, options, warn, valid) -> list[np.ndarray]:
    out = []
    for image in run._decoded(vae, z.to(_device(vae)), options, warn):
        if isinstance(image, Exception):
            raise image
        out.append(images.to_uint8(run._crop(image, valid)))
    return out


def decode_clips(vae, info, items: list[Item], options: run.Options, clip_format: str = "mp4", *, report=None,
                 warn=None, stop: threading.Event | None = None, claims=None) -> run.Summary:
    """Decode clip latent files to videos (mp4 / gif / webp) at their recorded fps, or to folders of frames."""
    warn = warn or (lambda message: None)
    stop = stop if stop is not None else threading.Event()
    items = [replace(i, output=clip_output(i.output, clip_format)) for i in items]

    def check(item: Item):
        try:
            frames = latents.read_metadata(item.path)[1][options.key][0]
        except Exception:  # the input is unreadable: decode reports it
            return "redo", ""
        return ("done", "") if is_complete(item.output, clip_format, frames) else ("redo", "")

    def work(item: Item):
        clip = _open_clip_latent(item.path, vae, info, options)
        try:
            with safe_open(str(item.path), "pt") as f, \
                    ClipWriter(item.output, clip_format, fps=clip.fps, timestamps=clip.timestamps,
                               quality=options.quality) as writer:
                frames = f.get_slice(options.key)
                for a in range(0, clip.frames, options.batch_size):
                    if stop.is_set():
                        return None
                    z = frames[a:a + options.batch_size].float() / clip.scale + clip.shift
                    for rgb in _decode_frames(vae, z, options, warn, clip.valid):
                        writer.add(rgb)
                writer.commit()
                size = [3, clip.valid[3] - clip.valid[1], clip.valid[2] - clip.valid[0]]
        except SafetensorError as e:
            raise InputError(f"not a readable safetensors file (truncated or corrupt?): {e}") from None
        return ClipRecord(item.source, str(item.output), "ok", shape=[clip.frames, *size], frames=clip.frames,
                          fps=clip.fps)

    return _drive(items, check, work, options, report, stop, claims)


# --- roundtrip ------------------------------------------------------------------------------------------------

def flicker(errors_prev: torch.Tensor, errors: torch.Tensor) -> float:
    """Mean absolute change of the reconstruction error between two consecutive frames."""
    return (errors - errors_prev).abs().mean().item()


def roundtrip_clips(vae, info, items: list[Item], options: run.Options, selection: Selection = Selection(),
                    clip_format: str = "mp4", *, seed=None, report=None, warn=None,
                    stop: threading.Event | None = None) -> run.Summary:
    """Encode then decode each clip in memory, exactly as encode then decode would; per clip: mean and minimum
    per-frame PSNR/SSIM and flicker. With outputs, writes the reconstruction and a side-by-side clip."""
    warn = warn or (lambda message: None)
    stop = stop if stop is not None else threading.Event()
    selection.check()
    seed = seed if seed is not None else run._run_seed(options)
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor)
    items = [replace(i, output=clip_output(i.output, clip_format)) if i.output else i for i in items]

    def work(item: Item):
        psnrs, ssims, flickers, prev = [], [], [], None
        with FrameReader(item.path, max_pixels=options.max_pixels, alpha_background=options.alpha_background) \
                as reader:
            recon_w = compare_w = None
            if item.output is not None:
                recon_w = ClipWriter(item.output, clip_format, fps=reader.info.source_fps, quality=options.quality)
                compare_w = ClipWriter(compare_output(item.output, clip_format), clip_format,
                                       fps=reader.info.source_fps, quality=options.quality)
            try:
                geometry, stamps = None, []
                for batch in reader.batches(selection, options.batch_size):
                    if stop.is_set():
                        return None
                    x, geometry, _ = _prepare(batch, vae, item, options, seed, geometry)
                    stored = _stored(vae, x, batch, item, options, seed, warn)
                    z = torch.stack([s["latent"].float() / scale + shift for s in stored])
                    for xi, recon in zip(x, _decode_frames(vae, z, options, warn, geometry.valid)):
                        original = images.to_uint8(run._crop(xi, geometry.valid))
                        ref = torch.from_numpy(original).permute(2, 0, 1).float() / 255
                        got = torch.from_numpy(recon).permute(2, 0, 1).float() / 255
                        psnrs.append(psnr(ref, got))
                        try:
                            ssims.append(ssim(ref, got))
                        except ValueError:  # smaller than the 11x11 window
                            pass
                        err = got - ref
                        if prev is not None:
                            flickers.append(flicker(prev, err))
                        prev = err
                        if recon_w is not None:
                            if recon_w.count == 0:  # the rate as known now (a GIF's grows with its frames)
                                recon_w.fps = compare_w.fps = _clip_fps(reader, selection, lambda m: None, "")
                            recon_w.add(recon)
                            compare_w.add(images.side_by_side(original, recon))
                    stamps += [t for _, t, _ in batch]
                if not psnrs:
                    raise _no_frames(reader)
                fps = _clip_fps(reader, selection, warn, item.source)
                if recon_w is not None:
                    for w in (recon_w, compare_w):
                        w.fps, w.timestamps = fps, stamps
                        w.commit()
            finally:
                for w in (recon_w, compare_w):
                    if w is not None:
                        w.abort()
        finite = [p for p in psnrs if np.isfinite(p)]
        return ClipRecord(item.source, str(item.output) if item.output else None, "ok",
                          shape=[len(psnrs), 3, geometry.valid[3] - geometry.valid[1],
                                 geometry.valid[2] - geometry.valid[0]],
                          psnr=float(np.mean(finite)) if finite else float("inf"),
                          ssim=float(np.mean(ssims)) if ssims else None, frames=len(psnrs), fps=fps,
                          psnr_min=min(psnrs), ssim_min=min(ssims) if ssims else None,
                          flicker=float(np.mean(flickers)) if flickers else 0.0)

    summary = _drive(items, None, work, options, report, stop)
    summary.seed = seed
    return summary
