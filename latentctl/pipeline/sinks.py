"""Where results go: one file per item (FileSink), or WebDataset tar shards (ShardSink). Both write atomically
and say what "done" means for resume.

A sink is used by a run in this order: open(settings, check) once; place(item) and check(item) for each item
as the driver pulls it; write(item, data, row) from writer threads; record(record) for every Record, on the
calling thread; shard_ended(shard) when a source has given all of a shard's items; close(interrupted) last,
which also writes OUT/index.parquet when the sink keeps an index.
"""

import json
import os
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from . import index as index_mod
from .outputs import temp_path
from .latents import atomic_write, read_metadata
from .outputs import clean_stale_temps
from .sources import LATENT_EXT, Shard


def _caption(carried: dict | None) -> str | None:
    data = (carried or {}).get("txt")
    return data.decode("utf-8", "replace") if data is not None else None


class FileSink:
    """Today's layout: one output file per item (a latent, or an image for decode), written atomically.
    A tar sample's output is OUT/SHARD/KEY + suffix, and its carried members go beside it as KEY.EXT."""

    def __init__(self, out_dir: Path | None, suffix: str = ".safetensors", *, index: bool = False):
        self.out_dir, self.suffix, self.index = (Path(out_dir) if out_dir is not None else None), suffix, index
        self._check = None
        self._rows: list[dict] = []
        self._lock = threading.Lock()

    def open(self, settings: dict, check) -> None:
        """check(item) -> (state, reason) for an item whose output exists (run.latent_check, or decode's check)."""
        self._check = check

    def place(self, item):
        if item.output is None and item.key is not None and self.out_dir is not None:
            item.output = self.out_dir / item.shard.name / (item.key + self.suffix)
        return item

    def check(self, item) -> tuple[str, str]:
        if item.output is None or not item.output.exists() or self._check is None:
            return "todo", ""
        return self._check(item)

    def _carried_path(self, item, ext: str) -> Path:
        return item.output.with_name(item.output.name[:-len(self.suffix)] + "." + ext)

    def write(self, item, data: bytes, row: dict | None = None) -> str:
        for ext, blob in (item.carried or {}).items():  # carried first: the output itself is the "done" mark
            path = self._carried_path(item, ext)
            if path != item.output:
                atomic_write(path, blob)
        atomic_write(item.output, data)
        if self.index and row is not None:
            self._row(item, "ok", size=len(data), caption=_caption(item.carried), **row)
        return str(item.output)

    def _row(self, item, status: str, **values) -> None:
        where = item.output.relative_to(self.out_dir).as_posix() if item.output is not None else None
        key = item.key if item.key is not None else \
            (Path(where).with_suffix("").as_posix() if where else item.source)
        with self._lock:
            self._rows.append(index_mod.row(key=key, path=where, status=status, **values))

    def record(self, record) -> None:
        item = record.item
        if not self.index or item is None:
            return
        if record.status == "error":
            self._row(item, "error", source=item.source, error=record.error)
        elif record.status == "skipped" and item.output is not None:
            self.written(item)

    def written(self, item) -> None:
        """An index row for an output that is complete on disk (a skipped one, or one another process wrote: the
        Ray engine's actors), read back from its header."""
        if not self.index or item.output is None:
            return
        try:
            meta, shapes = read_metadata(item.output)
        except Exception:
            return
        txt = self._carried_path(item, "txt")
        caption = txt.read_text("utf-8", "replace") if txt.exists() else None
        self._row(item, "ok", size=item.output.stat().st_size, shape=shapes.get("latent"),
                  source=meta.get("source", item.source), source_sha256=meta.get("source_sha256"),
                  caption=caption)

    def shard_ended(self, shard) -> None:
        pass

    def close(self, interrupted: bool) -> None:
        if self.index and self.out_dir is not None and (any(r["status"] == "ok" for r in self._rows)
                                                        or (self.out_dir / index_mod.NAME).exists()):
            index_mod.merge_files(self.out_dir, self._rows)


@dataclass
class _Open:
    """A shard being written."""

    tmp: Path
    tar: tarfile.TarFile | None = None
    file: object = None
    ok: int = 0
    failed: int = 0
    seen: int = 0
    errors: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    shard_error: str | None = None
    rows: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def stats_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}_stats.json"


class ShardSink:
    """WebDataset shards: one output shard per input shard (same name) or per group of loose files. Each sample
    is KEY.latent.safetensors (the bytes of a latent file) plus its carried members. A shard is written to a
    temporary file, fsynced and renamed, then NAME.parquet (its index rows), then NAME_stats.json, last: a shard
    is done when its stats say so, with this run's settings and the same input."""

    def __init__(self, out_dir: Path, *, overwrite: bool = False, index: bool = True):
        self.out_dir, self.overwrite, self.index = Path(out_dir), overwrite, index
        self.settings: dict = {}
        self._open: dict[Shard, _Open] = {}
        self._done: set[Shard] = set()
        self._finished: set[Shard] = set()
        self._lock = threading.Lock()

    def open(self, settings: dict, check=None) -> None:
        self.settings = dict(settings)
        clean_stale_temps([self.out_dir])  # shards a killed run was writing (its process is gone)

    # --- resume ---------------------------------------------------------------------------------------------

    def done_rows(self, shard: Shard) -> list[dict] | None:
        """The index rows of a shard a previous run finished with these settings from the same input, else None."""
        if self.overwrite:
            return None
        try:
            stats = json.loads(stats_path(self.out_dir, shard.name).read_text())
            if (stats.get("status") != "done" or stats.get("settings") != self.settings
                    or stats.get("identity") != shard.identity
                    or not (self.out_dir / f"{shard.name}.tar").is_file()):
                return None
            rows = index_mod.read(self.out_dir / f"{shard.name}.parquet")
        except Exception:  # missing, half-written or foreign: the shard is redone
            return None
        self._done.add(shard)
        return rows

    def place(self, item):
        item.output = self.out_dir / f"{item.shard.name}.tar"
        return item

    def check(self, item) -> tuple[str, str]:
        return ("done", "") if item.shard in self._done else ("todo", "")

    # --- writing --------------------------------------------------------------------------------------------

    def _state(self, shard: Shard) -> _Open:
        st = self._open.get(shard)
        if st is None:
            tmp = temp_path(self.out_dir / f"{shard.name}.tar")
            st = self._open[shard] = _Open(tmp)
        if st.tar is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            st.file = open(st.tmp, "wb")
            st.tar = tarfile.open(fileobj=st.file, mode="w", format=tarfile.PAX_FORMAT)
        return st

    def write(self, item, data: bytes, row: dict | None = None) -> str:
        import io

        member = f"{item.key}.{LATENT_EXT}"
        with self._lock:
            st = self._state(item.shard)
            offset = None
            for name, blob in [(member, data)] + [(f"{item.key}.{e}", b) for e, b in (item.carried or {}).items()]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), int(time.time()), 0o644
                st.tar.addfile(info, io.BytesIO(blob))
                if offset is None:  # where the latent's bytes start: the end of the data, back by its padded size
                    offset = st.tar.offset - (-(-len(blob) // tarfile.BLOCKSIZE)) * tarfile.BLOCKSIZE
            if self.index:
                st.rows.append(index_mod.row(key=item.key, shard=item.shard.name, path=f"{item.shard.name}.tar",
                                             member=member, offset=offset, size=len(data), status="ok",
                                             caption=_caption(item.carried), **(row or {})))
        return f"{item.output}:{item.key}"

    def record(self, record) -> None:
        item = record.item
        if item is None or item.shard is None or item.shard in self._done:
            return
        with self._lock:
            st = self._open.get(item.shard) or self._open.setdefault(
                item.shard, _Open(temp_path(self.out_dir / f"{item.shard.name}.tar")))
            st.seen += 1
            if record.status == "ok":
                st.ok += 1
            elif record.status == "skipped":  # by the run's own rule (e.g. an image too small for its bucket)
                st.skipped[item.key] = record.error or ""
            elif record.status == "error":
                st.failed += item.key is not None
                if item.key is None:
                    st.shard_error = record.error
                else:
                    st.errors[item.key] = record.error
                    if self.index:
                        st.rows.append(index_mod.row(key=item.key, shard=item.shard.name, status="error",
                                                     source=item.source, error=record.error))
        self._maybe_finish(item.shard)

    def shard_ended(self, shard: Shard) -> None:
        if shard not in self._done:
            self._maybe_finish(shard)

    def _maybe_finish(self, shard: Shard) -> None:
        st = self._open.get(shard)
        if shard.total is None or shard in self._finished or (st.seen if st is not None else 0) < shard.total:
            return
        with self._lock:
            st = self._state(shard)  # an empty shard (or one of errors only) is still a valid, empty tar
            st.tar.close()
            st.file.flush()
            os.fsync(st.file.fileno())
            st.file.close()
            os.replace(st.tmp, self.out_dir / f"{shard.name}.tar")
            if self.index:
                index_mod.write(self.out_dir / f"{shard.name}.parquet", st.rows)
            stats = {"status": "done", "input": shard.source, "identity": shard.identity, "count": st.seen,
                     "ok": st.ok, "failed": st.failed, "errors": st.errors, "skipped": st.skipped,
                     "shard_error": st.shard_error,
                     "settings": self.settings, "seconds": round(time.perf_counter() - st.started, 3),
                     "latentctl_version": __version__}
            atomic_write(stats_path(self.out_dir, shard.name), (json.dumps(stats, indent=1) + "\n").encode())
            self._finished.add(shard)
            del self._open[shard]

    def close(self, interrupted: bool) -> None:
        """Shards not finished (an interrupted run) leave nothing behind: their temporary files are removed."""
        with self._lock:
            for st in self._open.values():
                if st.tar is not None:
                    st.file.close()
                    st.tmp.unlink(missing_ok=True)
            self._open.clear()
        if self.index and (self._finished or self._done or (self.out_dir / index_mod.NAME).exists()):
            index_mod.merge_shards(self.out_dir)
