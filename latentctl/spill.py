"""Whole activations kept in a temporary file instead of in memory, read and written by region (for tiling).

A 4096x4096 image's 128-channel activation is 8.6 GB in float32. When tiling cannot hold such a tensor in its
memory budget it can recompute it (tiling/) or keep it here, on disk, at the price of writing it once and
reading it back. The file is unlinked as soon as it is made, so it vanishes with this object or with the
process, however that ends; its space is reserved up front, so a full disk is a clear error, not a crash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UsageError


def free_bytes(folder: str | Path) -> int:
    """Free space in `folder` (0 if it does not exist)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _write_all(fd: int, data, offset: int):
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _read_all(fd: int, data, offset: int):
    view = memoryview(data).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError("spill file: read past its end")
        view, offset = view[n:], offset + n


class SpilledTensor:
    """A (B, C, H, W) tensor stored channels-last (row after row of pixels) in a temporary file.

    Indexing copies a region in or out with plain reads and writes, a row of the region at a time (one call
    for full-width regions): t[:, :, y0:y1, x0:x1] and t[:, :, y0:y1, x0:x1] = value. Nothing of it stays in
    this process's memory; the OS may keep the file in its page cache and writes it to disk as it sees fit."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device | str, folder: str | Path):
        b, c, h, w = shape
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
        self._pixel = c * torch.empty((), dtype=dtype).element_size()
        self.nbytes = b * h * w * self._pixel
        self._file = tempfile.TemporaryFile(dir=folder, prefix="latentctl-spill-")
        try:
            os.posix_fallocate(self._file.fileno(), 0, self.nbytes)
        except OSError as e:
            self._file.close()
            raise UsageError(f"tiling: no room for a {self.nbytes / 2**30:.1f} GiB spill file in {folder} "
                             f"({e.strerror}); free some space, point --spill-dir elsewhere, or raise --max-memory"
                             ) from None

    def _region(self, idx) -> tuple[int, int, int, int]:
        if not isinstance(idx, tuple) or len(idx) != 4 or idx[0] != slice(None) or idx[1] != slice(None):
            raise IndexError("SpilledTensor: only t[:, :, rows, cols] is supported")
        y0, y1, _ = idx[2].indices(self.shape[2])
        x0, x1, _ = idx[3].indices(self.shape[3])
        return y0, max(y0, y1), x0, max(x0, x1)

    def _chunks(self, y0: int, y1: int, x0: int, x1: int):
        """(sample, first row, rows, file offset) of the contiguous runs of bytes that make up a region."""
        b, _, h, w = self.shape
        for i in range(b):
            if x0 == 0 and x1 == w:
                yield i, 0, y1 - y0, (i * h + y0) * w * self._pixel
            else:
                for r in range(y1 - y0):
                    yield i, r, 1, ((i * h + y0 + r) * w + x0) * self._pixel

    def __getitem__(self, idx) -> torch.Tensor:
        y0, y1, x0, x1 = self._region(idx)
        out = torch.empty(self.shape[0], y1 - y0, x1 - x0, self.shape[1], dtype=self.dtype)   # B, H, W, C
        raw = out.view(torch.uint8).numpy()
        for i, r, n, offset in self._chunks(y0, y1, x0, x1):
            _read_all(self._file.fileno(), raw[i, r:r + n], offset)
        return out.to(self.device).permute(0, 3, 1, 2)

    def __setitem__(self, idx, value: torch.Tensor):
        y0, y1, x0, x1 = self._region(idx)
        rows = value.permute(0, 2, 3, 1).to("cpu", self.dtype).contiguous()                  # B, H, W, C
        if rows.shape != (self.shape[0], y1 - y0, x1 - x0, self.shape[1]):
            raise ValueError(f"SpilledTensor: a {tuple(value.shape)} value for region {(y0, y1, x0, x1)}")
        raw = rows.view(torch.uint8).numpy()
        for i, r, n, offset in self._chunks(y0, y1, x0, x1):
            _write_all(self._file.fileno(), raw[i, r:r + n], offset)

    def close(self):
        self._file.close()
