"""OUT/index.parquet: one row per sample, so a trainer finds every latent with one call:

    import pyarrow.parquet as pq
    rows = pq.read_table("latents/index.parquet").to_pylist()

Columns: key; where the latent is (path: a file under OUT, or a shard `NAME.tar` with member, offset and size of
the member's bytes in it); shape (C, h, w); source and source_sha256 (the image it came from); caption (a
carried .txt member); status (ok | error) and error. Written atomically at the end of a run and merged with
what earlier runs wrote: shards keep their rows in NAME.parquet (written before their stats), so the index can
always be rebuilt from the shards that are done. Ranks and runs sharing OUT merge one at a time (under
OUT/.latentctl-index.lock, removed after), so each rank's rows join the others' and the last one to finish leaves the whole index.
"""

import contextlib
import io
import json
import os
import time
from pathlib import Path

NAME = "index.parquet"
COLUMNS = ("key", "path", "shard", "member", "offset", "size", "shape", "source", "source_sha256", "caption",
           "status", "error")


def _schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("path", pa.string()), ("shard", pa.string()), ("member", pa.string()),
                      ("offset", pa.int64()), ("size", pa.int64()), ("shape", pa.list_(pa.int32())),
                      ("source", pa.string()), ("source_sha256", pa.string()), ("caption", pa.string()),
                      ("status", pa.string()), ("error", pa.string())])


def row(**values) -> dict:
    """A full row: the columns not given are None."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise TypeError(f"not index columns: {sorted(unknown)}")
    out = {c: values.get(c) for c in COLUMNS}
    if out["shape"] is not None:
        out["shape"] = [int(v) for v in out["shape"]]
    return out


def write(path: Path, rows: list[dict]) -> None:
    """Rows -> a parquet file, atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .latents import atomic_write

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row(**r) for r in rows], schema=_schema()), buffer)
    atomic_write(Path(path), buffer.getvalue())


def read(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()


@contextlib.contextmanager
def _merging(out_dir: Path, stale: float = 60.0):
    """One merge at a time in OUT/ (concurrent ranks would otherwise lose each other's rows): a lock file created
    with O_EXCL (works across machines on a shared folder), removed after the merge; a lock left by a run killed
    while merging is broken after `stale` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / ".latentctl-index.lock"
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale:
                    lock.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def merge_files(out_dir: Path, new_rows: list[dict]) -> None:
    """One-file-per-latent layout: this run's rows replace earlier rows of the same path (or the same key, for
    an input that failed); earlier rows whose file still exists stay."""
    out_dir = Path(out_dir)
    with _merging(out_dir):
        _merge_files(out_dir, new_rows)


def _merge_files(out_dir: Path, new_rows: list[dict]) -> None:
    old = []
    if (out_dir / NAME).exists():
        try:
            old = read(out_dir / NAME)
        except Exception:
            old = []  # an unreadable index is rebuilt from this run's rows
    paths = {r["path"] for r in new_rows if r["path"]}
    keys = {r["key"] for r in new_rows}
    kept = [r for r in old if r["path"] not in paths and r["key"] not in keys
            and (r["path"] is None or (out_dir / r["path"]).exists())]
    write(out_dir / NAME, sorted(kept + new_rows, key=lambda r: (r["path"] or "", r["key"] or "")))


def done_shards(out_dir: Path) -> list[str]:
    """Names of the shards under out_dir whose stats say done."""
    names = []
    for stats in sorted(Path(out_dir).glob("*_stats.json")):
        try:
            if json.loads(stats.read_text()).get("status") == "done":
                names.append(stats.name[:-len("_stats.json")])
        except (OSError, ValueError):
            continue
    return names


def merge_shards(out_dir: Path) -> None:
    """Shard layout: the index is every done shard's NAME.parquet, in shard order."""
    out_dir = Path(out_dir)
    with _merging(out_dir):
        rows = []
        for name in done_shards(out_dir):
            part = out_dir / f"{name}.parquet"
            if part.exists():
                rows += read(part)
        write(out_dir / NAME, rows)
