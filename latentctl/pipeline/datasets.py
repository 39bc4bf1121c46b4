"""A run's items and sink from what the user named: loose files or tar shards in, files or shards out.

    from latentctl.pipeline import datasets, encode_files
    items, sink = datasets.plan_encode(["shards/{00000..00009}.tar"], "latents/", to="wds")
    summary = encode_files(vae, info, items, Options(), sink=sink)

Tar shards are streamed: `items` is then a generator that reads one shard at a time, asks the sink first whether
the shard is already done (and skips it whole if so), and tells the sink when it has given all of a shard's items.
"""

from pathlib import Path, PurePosixPath

from ..errors import UsageError
from . import media, outputs, run, sources
from .inputs import Item
from .sinks import FileSink, ShardSink

TARGETS = ("files", "wds")
DEFAULT_SHARD_SIZE = 1000


def _specs(inputs: list[str], stdin_lines, null: bool = False) -> list[str]:
    """`-` replaced by the paths on stdin (read once), so the kind of input can be decided from them."""
    if "-" not in inputs:
        return list(inputs)
    if stdin_lines is None:
        raise UsageError("'-' reads paths from stdin, but no stdin was given")
    lines = list(stdin_lines) if null else [line.rstrip("\r\n") for line in stdin_lines]
    out = []
    for spec in inputs:
        out += [line for line in lines if line.strip()] if spec == "-" else [spec]
    return out


def _stream(shards: list, sink, wanted: str, groups: dict | None = None):
    for shard in shards:
        done = sink.done_rows(shard) if hasattr(sink, "done_rows") else None
        if done is not None:
            if groups is not None:
                yield from groups[shard]
            else:
                for r in done:
                    yield Item(r["source"] or shard.source, shard.path, PurePosixPath(shard.name), key=r["key"],
                                   shard=shard)
            continue
        yield from (groups[shard] if groups is not None else sources.samples(shard, wanted))
        sink.shard_ended(shard)


def plan_encode(inputs: list[str], out_dir, *, to: str = "files", shard_size: int | None = None,
                overwrite: bool = False, stdin_lines=None, part=None, **paths):
    """(items, sink) for encode_files. part(list) -> this rank's part of it (latentctl/dist): applied to the
    shards (whole shards go to one rank), or to the loose files."""
    part = part or (lambda xs: xs)
    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: choose {', '.join(TARGETS)}")
    out_dir = Path(out_dir)
    outputs.probe(out_dir)
    outputs.clean_stale_temps([out_dir])  # a killed run's shard temporaries (file outputs: per folder, in run.py)
    stdin_lines = list(stdin_lines) if stdin_lines is not None else None  # read once, used twice
    specs = _specs(inputs, stdin_lines, paths.get("null", False))
    if sources.is_shard_input(specs):
        if shard_size is not None:
            raise UsageError("--shard-size is for loose files; an output shard keeps its input shard's samples")
        shards = part(sources.discover_shards(specs, exclude=out_dir))
        sink = ShardSink(out_dir, overwrite=overwrite) if to == "wds" else FileSink(out_dir, index=True)
        return _stream(shards, sink, "image"), sink
    if to == "files":  # images and clips (media.py), one file each
        if shard_size is not None:
            raise UsageError("--shard-size is for --to wds")
        return part(media.plan_encode(inputs, out_dir, stdin_lines=stdin_lines, **paths)), FileSink(out_dir, index=True)
    items = run.plan_encode(inputs, out_dir, stdin_lines=stdin_lines, **paths)  # images only: a shard sample is one image
    if not items:
        raise UsageError("no input files found")
    grouped = sources.group_files(items, shard_size or DEFAULT_SHARD_SIZE)
    groups: dict = {}
    for item in grouped:
        groups.setdefault(item.shard, []).append(item)
    sink = ShardSink(out_dir, overwrite=overwrite)
    return _stream(part(list(groups)), sink, "image", groups), sink


def plan_decode(inputs: list[str], out_dir, *, image_format: str = "png", clip_format: str = "mp4",
                stdin_lines=None, part=None, **paths):
    """(items, sink) for decode_files: latent files, or latent shards (each sample's image goes to
    OUT/SHARD/KEY.png with its carried members beside it)."""
    out_dir = Path(out_dir)
    outputs.probe(out_dir)
    outputs.clean_stale_temps([out_dir])  # a killed run's shard temporaries (file outputs: per folder, in run.py)
    part = part or (lambda xs: xs)
    stdin_lines = list(stdin_lines) if stdin_lines is not None else None
    specs = _specs(inputs, stdin_lines, paths.get("null", False))
    sink = FileSink(out_dir, "." + image_format)
    if sources.is_shard_input(specs):
        return _stream(part(sources.discover_shards(specs, exclude=out_dir)), sink, "latent"), sink
    return part(media.plan_decode(inputs, out_dir, image_format, clip_format, stdin_lines=stdin_lines, **paths)), sink


def first_latent_metadata(inputs: list[str], stdin_lines=None) -> dict | None:
    """The metadata of the first readable latent in the shards named by `inputs` (None if there is none), so
    decode can pick the model that wrote them. Reads only as far as that latent."""
    from .latents import header

    specs = _specs(inputs, stdin_lines)
    for shard in sources.discover_shards(specs):
        for item in sources.samples(shard, "latent"):
            if item.data is not None:
                try:
                    return header(item.data)[0]
                except Exception:
                    continue
    return None
