"""Find the inputs (files, folders, globs, `-` for paths on stdin), give each an output path, decide what to skip.

One rule maps every input to its output, whichever way it was named: the output mirrors the file's path
relative to the *input root*, which is `--root` if given, else the deepest folder that holds all inputs:
  folder `imgs/`          counts as imgs/ itself        imgs/a/b.jpg  -> OUT/a/b.safetensors
  glob `imgs/*/*.jpg`     the part before the wildcard  imgs/a/b.jpg  -> OUT/a/b.safetensors
  file `imgs/a/b.jpg`     its folder                    imgs/a/b.jpg  -> OUT/b.safetensors
  stdin `-`               each path's folder, as a file named on the command line
So `latentctl encode setA setB -o OUT` writes OUT/setA/... and OUT/setB/..., and the same files given as
arguments or on stdin get the same outputs; give `--root` when different runs name different parts of one tree.

Folders are walked recursively, into folders reached through symbolic links too (a link back to a folder being
walked is not followed again: loops are cut by device and inode). Hidden entries and the output folder are left
out. What cannot be used is an item with an error, never left out silently: an unreadable folder, a named pipe,
socket or device (reported without opening it), a broken link.
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import UsageError
from .provenance import not_regular

# Everything pillow registers (png, jpg/jpeg, webp, bmp, tif/tiff, gif, ...), read once at import.
IMAGE_EXTS = frozenset(ext.lower() for ext in Image.registered_extensions())
LATENT_EXTS = frozenset({".safetensors"})
_WILDCARDS = set("*?[")


@dataclass
class Item:
    """One input file and where its result goes."""

    source: str                 # the path as the user gave or will recognise it (error lines, metadata)
    path: Path                  # what to open
    rel: PurePosixPath          # path under the input root; the output mirrors it
    output: Path | None = None
    error: str | None = None    # already known to be unusable (missing file, glob matching nothing, name clash)
    redo: str | None = None     # why an existing output is made again ("source changed", ...)
    folder: bool = False        # a folder that could not be walked: an error, no output
    data: bytes | None = None   # the input's bytes when it does not live in a file of its own (a tar member)
    key: str | None = None      # a tar sample's key (WebDataset: the member name up to the first dot of its basename)
    carried: dict[str, bytes] | None = None  # a tar sample's other members by extension (".txt"), copied unchanged
    shard: object | None = None  # the sources.Shard this item comes from or goes to, if any


def _has_wildcard(text: str) -> bool:
    return any(c in _WILDCARDS for c in text)


def split_paths(text: str, null: bool = False) -> list[str]:
    """Paths piped on stdin: one per line (blank lines ignored, a trailing \\r dropped), or with `null`
    separated by NUL bytes as `find -print0` writes them (any name, newlines included)."""
    if null:
        return [p for p in text.split("\0") if p]
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


@dataclass
class _Found:
    source: str
    path: Path
    error: str | None = None
    folder: bool = False


def _walk(top: Path, exts: frozenset, exclude: str | None):
    """_Found entries under `top` with a wanted extension, sorted, files of a folder before its subfolders;
    hidden entries and the output folder skipped, symlinked folders followed (loops cut)."""
    def visit(folder: Path, ancestors: frozenset):
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield _Found(str(folder), folder, f"cannot read folder: {e.strerror or e}", folder=True)
            return
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            wanted = os.path.splitext(entry.name)[1].lower() in exts
            try:
                st = os.stat(path)  # follows links
            except OSError as e:
                if wanted:
                    broken = entry.is_symlink() and not os.path.lexists(os.path.realpath(path))
                    yield _Found(str(path), path, "broken symbolic link (no such file)" if broken else f"cannot read: "
                                 f"{e.strerror or e}")
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in ancestors and os.path.abspath(path) != exclude:
                    subfolders.append((path, ancestors | {key}))
            elif wanted:
                yield _Found(str(path), path, not_regular(st.st_mode))
        for path, seen in subfolders:
            yield from visit(path, seen)

    try:
        st = os.stat(top)
        start = frozenset({(st.st_dev, st.st_ino)})
    except OSError:
        start = frozenset()
    yield from visit(top, start)


def _file(spec: str) -> _Found:
    path = Path(spec)
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            return _Found(spec, path, "broken symbolic link (no such file)")
        return _Found(spec, path, "no such file" if isinstance(e, FileNotFoundError) else f"cannot read: "
                      f"{e.strerror or e}")
    if stat.S_ISDIR(st.st_mode):
        return _Found(spec, path, "is a folder (folders are only walked when named as an input)")
    return _Found(spec, path, not_regular(st.st_mode))


def _glob(pattern: str, exts: frozenset, exclude: str | None) -> tuple[str, list[_Found]]:
    """(the pattern's root: the part before the first wildcard, its matches)."""
    import glob

    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if _has_wildcard(p))
    root = str(Path(*parts[:fixed])) if fixed else "."
    found = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        m = Path(match)
        if m.is_dir():
            found += _walk(m, exts, exclude)
        elif m.suffix.lower() in exts:
            found.append(_file(match))
    if not found:
        return root, [_Found(pattern, Path(pattern), "no file matches this pattern")]
    return root, found


def discover(inputs: list[str], exts: frozenset, *, stdin_lines=None, exclude: Path | None = None,
             root: str | Path | None = None, null: bool = False) -> list[Item]:
    """The items named by `inputs`, in order. A file named explicitly is taken whatever its extension;
    folders and globs keep files with an extension in `exts`. `exclude` (the output folder) is never walked.
    `stdin_lines`: the paths read for `-` (lines, or exact names with `null`). `root`: the input root
    (default: the deepest folder holding all inputs, see the module's docstring)."""
    exclude = os.path.abspath(exclude) if exclude is not None else None
    found: list[_Found] = []
    bases: list[str] = []
    for spec in inputs:
        if spec == "-":
            if stdin_lines is None:
                raise UsageError("'-' reads paths from stdin, but no stdin was given")
            for line in stdin_lines:
                name = line if null else line.rstrip("\r\n")
                if name if null else name.strip():
                    found.append(_file(name))
                    bases.append(os.path.dirname(os.path.abspath(name)))
        elif os.path.isdir(spec):
            found += _walk(Path(spec), exts, exclude)
            bases.append(os.path.abspath(spec))
        elif not os.path.lexists(spec) and _has_wildcard(spec):
            base, matches = _glob(spec, exts, exclude)
            found += matches
            bases.append(os.path.abspath(base))
        else:
            found.append(_file(spec))
            bases.append(os.path.dirname(os.path.abspath(spec)))
    if root is not None:
        top = os.path.abspath(root)
    else:
        top = os.path.commonpath(bases) if bases else os.getcwd()
    items = []
    for f in found:
        rel = os.path.relpath(os.path.abspath(f.path), top)
        item = Item(f.source, f.path, PurePosixPath(Path(rel).as_posix()), error=f.error, folder=f.folder)
        if rel == ".." or rel.startswith(".." + os.sep):
            item.rel = PurePosixPath(f.path.name)
            item.error = item.error or f"not under the input root {root}"
        items.append(item)
    return items


def assign_outputs(items: list[Item], out_dir: Path, suffix: str, *, keep_ext: bool = False,
                   also=None) -> list[Item]:
    """Set each item's output (OUT/rel with `suffix` instead of its extension, or after it with `keep_ext`:
    a.jpg -> a.jpg.safetensors) and drop repeats of the same file. `also(output)` -> further paths an item writes.

    Different inputs that would write one path are each an error (none of them is written); the rest go on.
    """
    seen: dict[Path, Item] = {}
    kept = []
    for item in items:
        if item.folder:
            kept.append(item)
            continue
        rel = item.rel if item.rel.parts else PurePosixPath(item.path.name)
        name = rel.name + suffix if keep_ext else PurePosixPath(rel.name).with_suffix(suffix).name \
            if PurePosixPath(rel.name).suffix else rel.name + suffix
        item.output = Path(out_dir) / Path(*rel.parent.parts) / name
        first = seen.get(item.output)
        if first is not None and _same_file(first.path, item.path):
            continue  # the same file named twice (a folder and a file in it): one job
        seen.setdefault(item.output, item)
        kept.append(item)
    claims: dict[Path, list[Item]] = {}
    for item in kept:
        if item.output is not None and item.error is None:
            for p in [item.output, *(also(item.output) if also else [])]:
                claims.setdefault(p, []).append(item)
    for path, claimants in claims.items():
        for item in claimants if len(claimants) > 1 else []:
            if item.error is None:
                others = ", ".join(o.source for o in claimants if o is not item)
                item.error = (f"{others} would also be written to {path}: neither is written "
                              "(--keep-ext keeps the extension in output names; or rename one)")
    return kept


def check_unique(paths: list[Path], what: str = "output") -> None:
    """Raise UsageError when two of `paths` are the same (e.g. a clip's video and another input's image)."""
    seen = set()
    for p in paths:
        if p in seen:
            raise UsageError(f"two inputs would both write the {what} {p}")
        seen.add(p)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def resume_one(item: Item, overwrite: bool, check) -> tuple[str, str]:
    """One item's resume state, ("todo" | "done" | "conflict", reason), for drivers that take items one at a
    time. check(item) -> (state, reason) as in resume(), but given the item (a sink decides what done means)."""
    if item.error is not None or overwrite or check is None:
        return "todo", ""
    state, reason = check(item)
    if state == "redo":
        item.redo = reason or "incomplete output"
    return (state, reason) if state in ("done", "conflict") else ("todo", "")


def resume(items: list[Item], overwrite: bool, check) -> tuple[list[Item], list[Item], list[tuple[Item, str]]]:
    """Split items into (to do, already done, refused) by looking at their outputs.

    check(item) -> (state, reason): "done" (complete, made from this source with these settings: skipped),
    "redo" (corrupt, stale or foreign: written again, the reason kept in item.redo), "conflict" (complete but
    with other settings: refused, so that one folder never silently mixes two settings). --overwrite redoes all.
    """
    todo, done, refused = [], [], []
    for item in items:
        if item.error is not None or overwrite or item.output is None or not os.path.lexists(item.output):
            todo.append(item)
            continue
        state, reason = check(item)
        if state == "done":
            done.append(item)
        elif state == "conflict":
            refused.append((item, reason))
        else:
            item.redo = reason or "incomplete output"
            todo.append(item)
    return todo, done, refused
