"""Where results go, checked before any compute: the output folder can be made and written, no output is an input,
and every temporary file has a name no other process uses (and is cleaned once its process is gone).

Temporary files: `.NAME.HOST.PID-RANDOM.latentctl-tmp` beside the output NAME. Two runs on one folder never
share one; a run finds the ones left by dead processes of this host (killed runs, inputs that failed or vanished)
and removes them.
"""

import os
import secrets
import socket
from pathlib import Path

from ..errors import UsageError

TEMP_SUFFIX = ".latentctl-tmp"
_HOST = socket.gethostname().replace(".", "_").replace("/", "_") or "host"


def temp_path(path: Path) -> Path:
    """A fresh temporary name for writing `path`: hidden, in the same folder (so the rename is atomic),
    unique to this process and call."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary file's name, or None when the name does not say (older latentctl)."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3:
        return None
    host, pid_random = parts[1], parts[2]
    pid = pid_random.split("-", 1)[0]
    return (host, int(pid)) if pid.isdigit() and "-" in pid_random else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, run by someone else
        return True
    return True


def clean_stale_temps(folders) -> int:
    """Remove temporary files in `folders` left by dead latentctl processes of this host (and by versions that
    did not record their owner). Returns how many were removed; a folder that cannot be listed is left alone."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
                continue
            owner = _owner(entry.name)
            if owner is not None and (owner[0] != _HOST or owner[1] == os.getpid() or _alive(owner[1])):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def probe(out_dir: Path, flag: str = "--output") -> None:
    """Check once, before the model is loaded, that `out_dir` can be created and written: a test file is
    written and removed, and folders made for the test are removed again. Raises UsageError (one line)."""
    out_dir = Path(out_dir)
    existing = out_dir
    missing = []
    while not os.path.lexists(existing):
        missing.append(existing)
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "exists and is not a folder" if existing == out_dir else f"cannot be created: {existing} is not a folder"
        raise UsageError(f"{flag} {out_dir}: {where}")
    made = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            made.append(folder)
        test = temp_path(out_dir / "write-test")
        fd = os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(test)
    except OSError as e:
        verb = "cannot be created" if len(made) < len(missing) else "is not writable"
        raise UsageError(f"{flag} {out_dir}: {verb} ({e.strerror or e})") from None
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_inputs_as_outputs(pairs) -> None:
    """pairs: (input path, [output paths]). Raises UsageError when an output is an input file (the same file, also
    through links, or the same path), so that no command ever overwrites what it reads."""
    inputs = {}
    for source, _ in pairs:
        ident = _identity(source)
        if ident is not None:
            inputs[ident] = source
        inputs[os.path.realpath(source)] = source
    for source, outs in pairs:
        for out in outs:
            hit = inputs.get(os.path.realpath(out)) or inputs.get(_identity(out) or ("", ""))
            if hit is not None:
                raise UsageError(f"{out} is an input file ({hit}); writing there would overwrite it: "
                                 "choose another --output folder")
