"""The latent file: a plain .safetensors any trainer can read, written atomically.

Tensors: `latent` (C, h, w), the model-ready latent (z - shift) * scale, z being the posterior mean or a
sample; with store=posterior also `mean` and `logvar` (raw, unscaled) so training can draw a new sample
each epoch; with --flip also `latent_flipped` (and `mean_flipped`, `logvar_flipped`), the mirrored crop's. Metadata (strings only, as safetensors requires): see METADATA_KEYS.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from ..errors import InputError
from .outputs import temp_path

FORMAT = "latentctl-latent/1"
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METADATA_KEYS = (
    "format", "model", "weights_sha256", "scaling_factor", "shift_factor", "scaled", "store", "seed",
    "latent_dtype", "source", "source_path", "source_rel", "source_size", "source_mtime_ns", "source_sha256", "width", "height", "color_mode", "exif_transposed",
    "alpha_background", "resize", "center_crop", "resized", "crop_box", "valid_box", "padded", "factor",
    "latentctl_version", "buckets",
    # with --buckets (latentctl/buckets.py): the bucket, SDXL's conditioning as "H,W"-style pairs, the flipped crop
    "crop", "flip", "bucket", "upscaled", "original_size", "crop_top_left", "target_size", "crop_box_flipped",
    "crop_top_left_flipped",
)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader, and no crash at any moment, ever sees a partial file:
    a temporary file in the same folder (same filesystem, so the rename is atomic), fsync, os.replace."""
    atomic_stream(path, lambda f: f.write(data))


def atomic_stream(path: Path, fill) -> None:
    """atomic_write for data too large to hold: fill(binary file) writes it, then fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file's bytes. Tensors are made contiguous CPU copies: a slice of a batch must not save the batch."""
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"latent metadata must be strings: {bad}")
    raw = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    return _canonical(raw)


def _canonical(raw: bytes) -> bytes:
    """The same file with its JSON header's keys sorted (safetensors writes metadata in hash order, which
    changes from one process to the next): equal latents and metadata give equal bytes, in a file or a shard."""
    n = int.from_bytes(raw[:8], "little")
    head = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # the data stays 8-byte aligned, as safetensors keeps it
    return len(head).to_bytes(8, "little") + head + raw[8 + n:]


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, to_bytes(tensors, metadata))


def read_metadata(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) from the header only. Raises InputError if the file is not complete."""
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def header(data: bytes) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) from a latent file's bytes (e.g. a shard member), header only."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError(f"header of {n} bytes in {len(data)} bytes")
        head = json.loads(data[8:8 + n])
        meta = head.pop("__metadata__", None) or {}
        return dict(meta), {k: list(v["shape"]) for k, v in head.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def read(path: Path | bytes, key: str = "latent") -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor `key` (C, h, w) as float32 and the file's metadata. Raises InputError with the reason.
    `path` may also be the file's bytes (a tar member)."""
    if isinstance(path, (bytes, bytearray)):
        data = bytes(path)
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror or e}") from None
    t, meta = parse(data, key)
    return t.float(), meta


def parse(data: bytes, key: str = "latent") -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor `key` (C, h, w) as stored (any dtype) and the metadata, from a file's bytes."""
    meta = header(data)[0]
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"not a readable safetensors file (truncated or corrupt?): {_first_line(e)}") from None
    if key not in tensors:
        raise InputError(f"no tensor {key!r} in this file (it has {', '.join(sorted(tensors)) or 'none'}; "
                         "choose one with --key)")
    t = tensors[key]
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # (1, C, h, w), as some tools store a batch of one
    if t.ndim != 3:
        raise InputError(f"tensor {key!r} has shape {tuple(t.shape)}; expected (C, h, w)")
    return t, {str(k): str(v) for k, v in meta.items()}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check(path: Path, expected: dict[str, str]) -> tuple[str, str]:
    """For resuming: ("done", "") if `path` is a complete latent file written with the `expected` settings,
    ("conflict", why) if it is complete but was written with other settings, ("redo", why) otherwise.
    (Whether it was made from the same source is provenance.judge's question.)"""
    try:
        meta, shapes = read_metadata(path)
    except InputError as e:
        return "redo", str(e)
    return check_metadata(meta, shapes, expected)


def check_metadata(meta: dict[str, str], shapes: dict, expected: dict[str, str]) -> tuple[str, str]:
    """check() on a header already read."""
    if meta.get("format") != FORMAT or "latent" not in shapes:
        return "redo", "not a latentctl latent file"
    differ = [f"{k}={meta.get(k)!r} (this run: {v!r})" for k, v in expected.items() if meta.get(k) != v]
    if differ:
        return "conflict", ("already exists, written with other settings: " + ", ".join(differ)
                            + "; use --overwrite, or another output folder")
    return "done", ""
