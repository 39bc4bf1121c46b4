"""The pipeline's entry points for mixed inputs: each item goes to the image pipeline (run.py) or, when it is
a clip, to video.py; their records go to one `report` and their summaries add up.

Clips are told apart by extension (.mp4 .webm .mov .mkv .avi), or for .gif/.webp/.png by holding more than
one frame; for decode, by the latent file's kind=clip. Images are done first, then clips.
"""

import threading
from pathlib import Path

from . import run, video
from .frames import VIDEO_EXTS, Selection, is_clip
from .inputs import IMAGE_EXTS, LATENT_EXTS, Item, check_unique
from .outputs import refuse_inputs_as_outputs
from .clip_writers import CLIP_FORMATS, clip_output, compare_output
from .images import FORMATS as IMAGE_FORMATS

ENCODE_EXTS = IMAGE_EXTS | VIDEO_EXTS


def plan_encode(inputs: list[str], out_dir: Path, stdin_lines=None, **paths) -> list[Item]:
    """run.plan_encode, with videos found in folders and globs too."""
    return run.plan(inputs, out_dir, ENCODE_EXTS, ".safetensors", stdin_lines=stdin_lines, **paths)


def plan_decode(inputs: list[str], out_dir: Path, image_format: str = "png", clip_format: str = "mp4",
                stdin_lines=None, **paths) -> list[Item]:
    items = run.plan(inputs, out_dir, LATENT_EXTS, "." + image_format, stdin_lines=stdin_lines, **paths)
    check_unique([clip_output(i.output, clip_format) if _clip_latent(i) else i.output for i in items
                  if i.output is not None and i.error is None])
    return items


def plan_roundtrip(inputs: list[str], out_dir: Path | None, image_format: str = "png", clip_format: str = "mp4",
                   stdin_lines=None, **paths) -> list[Item]:
    items = run.plan(inputs, out_dir, ENCODE_EXTS, "." + image_format, stdin_lines=stdin_lines,
                     also=lambda output: [run.compare_path(output)], **paths)
    if out_dir is None:
        return items
    written = []
    for i in items:
        if i.output is None or i.error is not None:
            continue
        if _clip(i):
            out = clip_output(i.output, clip_format)
            written.append((i.path, [out, compare_output(out, clip_format)]))
        else:
            written.append((i.path, [i.output, run.compare_path(i.output)]))
    refuse_inputs_as_outputs(written)
    check_unique([p for _, outs in written for p in outs])
    return items


def _clip(item: Item) -> bool:
    return item.error is None and is_clip(item.path)


def _clip_latent(item: Item) -> bool:
    return item.error is None and video.is_clip_latent(item.path)


def _split(items: list[Item], test) -> tuple[list[Item], list[Item]]:
    flags = [test(i) for i in items]
    return [i for i, f in zip(items, flags) if not f], [i for i, f in zip(items, flags) if f]


def _images_then_clips(images, clips, run_images, run_clips, options: run.Options, stop) -> run.Summary:
    """run_images(items, stop), then run_clips(items, seed, stop) unless the run was stopped; one Summary.
    Clips reuse the images' store=sample seed, so one run records one seed."""
    stop = stop if stop is not None else threading.Event()
    a = run_images(images, stop) if images else run.Summary()
    halted = stop.is_set() or (options.fail_fast and a.failed > 0)
    b = run_clips(clips, a.seed, stop) if clips and not halted else run.Summary()
    total = len(images) + len(clips)
    s = run.Summary(total=total, ok=a.ok + b.ok, skipped=a.skipped + b.skipped, failed=a.failed + b.failed,
                    seconds=a.seconds + b.seconds, seed=a.seed if a.seed is not None else b.seed)
    s.interrupted = stop.is_set() and s.ok + s.skipped + s.failed < total
    return s


def _fresh(claims):
    """A claims object of its own for each part (a driver closes its claims when done, heartbeat included)."""
    return None if claims is None else type(claims)(ttl=claims.ttl, poll=claims.poll)


def _image_format_refused(items: list[Item], options: run.Options, report) -> run.Summary | None:
    """--format mp4/gif asked with image latents or images among the inputs: each of those is an error record."""
    if options.image_format in IMAGE_FORMATS:
        return None
    summary = run.Summary(total=len(items), failed=len(items))
    for item in items:
        if report is not None:
            report(run.Record(item.source, None, "error", f"--format {options.image_format} is for clips; this is "
                              f"one image (use {', '.join(IMAGE_FORMATS)})"))
    return summary


def encode_files(vae, info, items: list[Item], options: run.Options, *, selection: Selection = Selection(),
                 report=None, warn=None, stop: threading.Event | None = None, claims=None, sink=None) -> run.Summary:
    """run.encode_files for images, video.encode_clips for clips (items from plan_encode)."""
    selection.check()
    if not isinstance(items, list):  # streamed items (tar shard samples) are images
        return run.encode_files(vae, info, items, options, report=report, warn=warn, stop=stop, claims=claims,
                                sink=sink)
    images, clips = _split(items, _clip)
    return _images_then_clips(
        images, clips,
        lambda its, stop: run.encode_files(vae, info, its, options, report=report, warn=warn, stop=stop,
                                           claims=_fresh(claims), sink=sink),
        lambda its, seed, stop: video.encode_clips(vae, info, its, options, selection, seed=seed, report=report,
                                                   warn=warn, stop=stop, claims=_fresh(claims)),
        options, stop)


def decode_files(vae, info, items: list[Item], options: run.Options, *, clip_format: str = "mp4", report=None,
                 warn=None, stop: threading.Event | None = None, claims=None, sink=None) -> run.Summary:
    """run.decode_files for image latents, video.decode_clips for clip latents (items from plan_decode)."""
    if clip_format not in CLIP_FORMATS:
        raise ValueError(f"clip format {clip_format!r}: choose {', '.join(CLIP_FORMATS)}")
    if not isinstance(items, list):  # streamed items (latent shard samples) are images
        return run.decode_files(vae, info, items, options, report=report, warn=warn, stop=stop, claims=claims,
                                sink=sink)
    images, clips = _split(items, _clip_latent)
    return _images_then_clips(
        images, clips,
        lambda its, stop: _image_format_refused(its, options, report)
        or run.decode_files(vae, info, its, options, report=report, warn=warn, stop=stop, claims=_fresh(claims),
                            sink=sink),
        lambda its, seed, stop: video.decode_clips(vae, info, its, options, clip_format, report=report, warn=warn,
                                                   stop=stop, claims=_fresh(claims)),
        options, stop)


def roundtrip_files(vae, info, items: list[Item], options: run.Options, *, selection: Selection = Selection(),
                    clip_format: str = "mp4", report=None, warn=None,
                    stop: threading.Event | None = None) -> run.Summary:
    """run.roundtrip_files for images, video.roundtrip_clips for clips (items from plan_roundtrip)."""
    selection.check()
    images, clips = _split(items, _clip)
    return _images_then_clips(
        images, clips,
        lambda its, stop: _image_format_refused(its, options, report)
        or run.roundtrip_files(vae, info, its, options, report=report, warn=warn, stop=stop),
        lambda its, seed, stop: video.roundtrip_clips(vae, info, its, options, selection, clip_format, seed=seed,
                                                      report=report, warn=warn, stop=stop),
        options, stop)


__all__ = ["ENCODE_EXTS", "decode_files", "encode_files", "plan_decode", "plan_encode", "plan_roundtrip",
           "roundtrip_files"]
