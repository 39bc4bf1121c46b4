"""A clip's latent file, built frame batch by frame batch: the number of frames T is known only at the end,
so each tensor's frames are appended to an anonymous temporary file beside the output (O_TMPFILE on Linux:
no name, so a process killed at any moment leaves nothing behind) and copied into one .safetensors file,
through latents.atomic_stream, once the last frame is in. Memory holds one batch, never the clip.

The file is what safetensors.torch.save would write for the stacked tensors: an 8-byte little-endian header
length, a JSON header (dtype, shape, data_offsets per tensor; `__metadata__`), padded with spaces to a multiple
of 8, then the raw little-endian data.
"""

import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from .latents import atomic_stream

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class Spool:
    """Stacks tensors along a new first axis on disk. Use as a context manager (closing drops the spool)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.frames = 0
        self._files, self._shapes, self._dtypes = {}, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def append(self, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: name -> (B, ...) for B more frames; every call gives the same names, frame shapes and dtypes."""
        counts = {t.shape[0] for t in tensors.values()}
        if len(counts) != 1 or (self._files and set(tensors) != set(self._files)):
            raise ValueError("spool: every append needs the same tensors with the same number of frames")
        for name, t in tensors.items():
            if name not in self._files:
                if t.dtype not in _DTYPES:
                    raise ValueError(f"spool: dtype {t.dtype} is not stored")
                self._files[name] = tempfile.TemporaryFile(dir=self.folder)
                self._shapes[name], self._dtypes[name] = tuple(t.shape[1:]), t.dtype
            elif (tuple(t.shape[1:]), t.dtype) != (self._shapes[name], self._dtypes[name]):
                raise ValueError(f"spool: {name} frames of {tuple(t.shape[1:])} {t.dtype} after "
                                 f"{self._shapes[name]} {self._dtypes[name]}")
            raw = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)  # (B, ...) -> its bytes
            if sys.byteorder != "little":
                raise RuntimeError("spool: big-endian machines are not supported")
            self._files[name].write(raw.numpy().tobytes())
        self.frames += counts.pop()

    def header(self, metadata: dict[str, str]) -> bytes:
        """The safetensors header (length prefix included) for the frames appended so far."""
        entries, offset = {}, 0
        for name in sorted(self._files):
            size = self._files[name].tell()
            entries[name] = {"dtype": _DTYPES[self._dtypes[name]], "shape": [self.frames, *self._shapes[name]],
                             "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def write(self, path: Path, metadata: dict[str, str]) -> None:
        """The complete .safetensors file at `path`, atomically (temporary file, fsync, rename)."""
        if not self.frames:
            raise ValueError("spool: no frames to write")
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise TypeError(f"latent metadata must be strings: {bad}")
        head = self.header(metadata)

        def fill(out) -> None:
            out.write(head)
            for name in sorted(self._files):
                f = self._files[name]
                f.flush()
                f.seek(0)
                shutil.copyfileobj(f, out, 1 << 20)
                f.seek(0, 2)

        atomic_stream(path, fill)
