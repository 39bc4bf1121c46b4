"""Where an output came from, and whether it still stands for its input.

Every output records its source's identity: the absolute path, the path relative to the input root, size,
mtime (ns) and sha256. On a rerun an output is done only if its source is still that file:
  same path, same size and mtime  -> done (the fast path; --verify-sources always hashes instead)
  otherwise the sha256 decides    -> done when equal (a touched or moved file), else redone:
                                     "source changed" (same path, new content) or "other dataset" (another file
                                     mapped to this output, e.g. setB/ encoded into setA/'s folder)
Only regular files are opened; nothing here blocks on a named pipe or a device.
"""

import hashlib
import os
import stat
from dataclasses import dataclass

from ..errors import InputError

_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def not_regular(mode: int) -> str | None:
    """Why a file of this st_mode is not read ("a named pipe (FIFO)", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return "not a regular file: " + _KINDS.get(stat.S_IFMT(mode), "a special file")


@dataclass
class Source:
    """An input file's identity, taken from the same open file its bytes were read from."""

    path: str           # absolute (not resolved: a dataset reached through a link keeps its own path)
    rel: str            # relative to the input root: what the output path mirrors
    size: int
    mtime_ns: int
    sha256: str

    def metadata(self) -> dict[str, str]:
        return {"source_path": self.path, "source_rel": self.rel, "source_size": str(self.size),
                "source_mtime_ns": str(self.mtime_ns), "source_sha256": self.sha256}


def read_source(path, rel: str) -> tuple[bytes, Source]:
    """The file's bytes and identity. Opens only regular files (a FIFO is refused without blocking).
    Raises InputError with the reason."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        why = not_regular(st.st_mode)
        if why:
            raise InputError(why)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return data, Source(os.path.abspath(path), rel, len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())


def of_bytes(data: bytes, source: str, rel: str) -> Source:
    """The identity of an input that is not a file of its own (a tar member): its bytes' size and sha256."""
    return Source(source, rel, len(data), 0, hashlib.sha256(data).hexdigest())


def identify(path, rel: str) -> Source:
    """The identity of a file read in pieces elsewhere (a video clip): size and mtime, then its sha256."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}") from None
    why = not_regular(st.st_mode)
    if why:
        raise InputError(why)
    sha = _sha256_of(path)
    if sha is None:
        raise InputError("cannot read")
    return Source(os.path.abspath(path), rel, st.st_size, st.st_mtime_ns, sha)


def _sha256_of(path) -> str | None:
    """sha256 of a regular file's content, or None when it cannot be read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def judge(recorded: dict, path, rel: str, verify: bool = False) -> tuple[bool, str]:
    """(True, "") when the output whose metadata is `recorded` was made from the file at `path` as it is now,
    else (False, why): "source changed", "other dataset" or "no record of its source"."""
    want = recorded.get("source_sha256")
    if not want:
        return False, "no record of its source"
    here = os.path.abspath(path)
    same_place = recorded.get("source_path", here) == here and recorded.get("source_rel", rel) == rel
    if same_place and not verify:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and str(st.st_size) == recorded.get("source_size") \
                and str(st.st_mtime_ns) == recorded.get("source_mtime_ns"):
            return True, ""
    if _sha256_of(path) == want:
        return True, ""
    return False, "source changed" if same_place else "other dataset"
