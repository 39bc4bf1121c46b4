"""Find the inputs (files, folders, globs, `-` for paths on stdin), give each an output path, decide what to skip.

Output paths mirror each file's path relative to its input root:
  folder `imgs/`         imgs/a/b.jpg -> OUT/a/b.safetensors
  glob `imgs/*/*.jpg`    root = the part before the first wildcard (imgs/)
  file `imgs/a/b.jpg`    root = its own folder -> OUT/b.safetensors
  stdin `-`              root = the current folder (a path outside it keeps its absolute path under OUT)
so `find imgs -name '*.jpg' | latentctl encode - -o OUT` gives OUT/imgs/..., the same on every rerun.
"""

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import UsageError

# Everything pillow registers (png, jpg/jpeg, webp, bmp, tif/tiff, gif, ...), read once at import.
IMAGE_EXTS = frozenset(ext.lower() for ext in Image.registered_extensions())
LATENT_EXTS = frozenset({".safetensors"})
_WILDCARDS = set("*?[")


@dataclass
class Item:
    """One input file and where its result goes."""

    source: str                 # the path as the user gave or will recognise it (error lines, metadata)
    path: Path                  # what to open
    rel: PurePosixPath          # path under its input root; the output mirrors it
    output: Path | None = None
    error: str | None = None    # already known to be unusable (missing file, glob matching nothing)
    data: bytes | None = None   # the input's bytes when it does not live in a file of its own (a tar member)
    key: str | None = None      # a tar sample's key (WebDataset: the member name up to the first dot of its basename)
    carried: dict[str, bytes] | None = None  # a tar sample's other members by extension (".txt"), copied unchanged
    shard: object | None = None  # the sources.Shard this item comes from or goes to, if any


def _has_wildcard(text: str) -> bool:
    return any(c in _WILDCARDS for c in text)


def _relative_to_cwd(path: Path) -> PurePosixPath:
    """path relative to the current folder; outside it, the absolute path without its root ("/")."""
    absolute = Path(os.path.abspath(path))
    try:
        return PurePosixPath(absolute.relative_to(Path.cwd()).as_posix())
    except ValueError:
        return PurePosixPath(*absolute.parts[1:])


def _walk(root: Path, exts: frozenset, exclude: Path | None):
    """Files under root with a wanted extension, sorted, skipping hidden entries and the output folder."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or Path(os.path.abspath(os.path.join(folder, d))) != exclude))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                yield Path(folder) / name


def discover(inputs: list[str], exts: frozenset, *, stdin_lines=None, exclude: Path | None = None) -> list[Item]:
    """The items named by `inputs`, in order. A file named explicitly is taken whatever its extension;
    folders and globs keep files with an extension in `exts`. `exclude` (the output folder) is never walked."""
    exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
    items: list[Item] = []
    for spec in inputs:
        if spec == "-":
            if stdin_lines is None:
                raise UsageError("'-' reads paths from stdin, but no stdin was given")
            for line in stdin_lines:
                line = line.rstrip("\r\n")
                if line.strip():
                    items.append(_file_item(line, _relative_to_cwd(Path(line))))
            continue
        path = Path(spec)
        if path.is_dir():
            for f in _walk(path, exts, exclude):
                items.append(Item(str(f), f, PurePosixPath(f.relative_to(path).as_posix())))
        elif not path.exists() and _has_wildcard(spec):
            items += _glob(spec, exts, exclude)
        else:
            items.append(_file_item(spec, PurePosixPath(path.name)))
    return items


def _file_item(spec: str, rel: PurePosixPath) -> Item:
    path = Path(spec)
    item = Item(spec, path, rel)
    if path.is_dir():
        item.error = "is a folder (folders are only walked when named as an input)"
    elif not path.exists():
        item.error = "no such file" if not path.is_symlink() else "broken symbolic link"
    return item


def _glob(pattern: str, exts: frozenset, exclude: Path | None) -> list[Item]:
    import glob

    parts = Path(pattern).parts
    fixed = next(i for i, p in enumerate(parts) if _has_wildcard(p))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    found = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        m = Path(match)
        files = _walk(m, exts, exclude) if m.is_dir() else [m] if m.suffix.lower() in exts else []
        found += [Item(str(f), f, PurePosixPath(Path(os.path.relpath(f, root)).as_posix())) for f in files]
    if not found:
        return [Item(pattern, Path(pattern), PurePosixPath(Path(pattern).name), error="no file matches this pattern")]
    return found


def assign_outputs(items: list[Item], out_dir: Path, suffix: str) -> list[Item]:
    """Set each item's output (OUT/rel with `suffix`) and drop repeats of the same file.

    Two different inputs that map to one output are a usage error, raised before any work starts.
    """
    seen: dict[Path, Item] = {}
    kept = []
    for item in items:
        rel = item.rel if item.rel.parts else PurePosixPath(item.path.name)
        item.output = out_dir / Path(*rel.parts).with_suffix(suffix)
        first = seen.get(item.output)
        if first is None:
            seen[item.output] = item
            kept.append(item)
        elif _same_file(first.path, item.path):
            continue  # the same file named twice (a folder and a file in it): one job
        else:
            raise UsageError(f"{first.source} and {item.source} would both be written to {item.output}; "
                             "rename one, or give them different input roots")
    return kept


def check_unique(paths: list[Path], what: str = "output") -> None:
    """Raise UsageError when two of `paths` are the same (e.g. a reconstruction and another's side-by-side)."""
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
    return (state, reason) if state in ("done", "conflict") else ("todo", "")


def resume(items: list[Item], overwrite: bool, check) -> tuple[list[Item], list[Item], list[tuple[Item, str]]]:
    """Split items into (to do, already done, refused) by looking at their outputs.

    check(output) -> (state, reason): "done" (complete and written with these settings: skipped),
    "redo" (corrupt or foreign: written again), "conflict" (complete but with other settings: refused,
    so that one folder never silently mixes two settings). --overwrite redoes everything.
    """
    todo, done, refused = [], [], []
    for item in items:
        if item.error is not None or overwrite or item.output is None or not item.output.exists():
            todo.append(item)
            continue
        state, reason = check(item.output)
        if state == "done":
            temp_path(item.output).unlink(missing_ok=True)  # a killed --overwrite run may have left one
            done.append(item)
        elif state == "conflict":
            refused.append((item, reason))
        else:
            todo.append(item)
    return todo, done, refused


def temp_path(path: Path) -> Path:
    """The temporary file an output is written to before the rename: hidden, in the same folder, and
    always the same name, so a rerun overwrites what a killed run left behind."""
    return path.with_name(f".{path.name}.latentctl-tmp")
