"""Where items come from when they are WebDataset tar shards, and how loose files are grouped into shards.

A shard is read member by member in tarfile's stream mode, so memory holds the sample in hand (and the few the
driver has queued), never the shard. Members are grouped into samples by WebDataset's rule: the key is the member
name up to the first dot of its basename (`dir/000123.jpg` -> key `dir/000123`, extension `jpg`), and the members
of one sample are consecutive. In each sample the member whose extension is wanted (an image for encode, the
latent for decode) is the input; every other member is carried to the output unchanged.

Nothing from a tar is ever extracted to disk. A hostile shard costs items, not the run: an absolute or `..` name,
a link or device, a member over the size limit, a duplicate key, a sample without the wanted member is that
sample's error item; a file that is not a tar, or a tar cut short, is the shard's error item (samples read
before the break stay good).
"""

import glob as globlib
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import UsageError
from .inputs import IMAGE_EXTS, Item, _has_wildcard

SHARD_EXTS = (".tar",)
MAX_MEMBER_BYTES = 256 * 2**20     # a bigger member is refused before it is read (a hostile shard's bomb)
LATENT_EXT = "latent.safetensors"  # the member that holds a sample's latent in our output shards
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's base_plus_ext, minus hidden names
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(eq=False)
class Shard:
    """One input tar, or one group of loose files, and the output shard of the same name."""

    source: str                     # as the user named it (error lines, stats)
    name: str                       # the output shard's name without .tar ("00000")
    identity: dict                  # what must be unchanged for a finished output shard to count as done
    path: Path | None = None        # the tar to stream; None for a group of loose files
    total: int | None = None        # items this shard gave (samples and error items), once it has ended


# --- naming shards ----------------------------------------------------------------------------------------------

def expand_braces(spec: str) -> list[str]:
    """WebDataset's brace notation: `s/{00000..00002}.tar` -> s/00000.tar, s/00001.tar, s/00002.tar (zero
    padding kept); `{a,b}` -> a, b. Several braces expand as a product, left to right."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    body, head, tail = m.group(1), spec[:m.start()], spec[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        if int(b) < int(a):
            raise UsageError(f"{spec}: range {{{body}}} runs backwards")
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        choices = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _tars_under(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or Path(os.path.abspath(os.path.join(root, d))) != exclude))
        found += [Path(root) / f for f in sorted(files) if f.endswith(SHARD_EXTS) and not f.startswith(".")]
    return found


def _has_images(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for f in files):
            return True
    return False


def is_shard_input(inputs: list[str]) -> bool:
    """Do these inputs name tar shards? (a .tar path, brace notation, a glob of .tar, a folder holding .tar
    files: an img2dataset output folder is one). Mixing shards and loose images in one run is refused."""
    tars = loose = False
    for spec in inputs:
        if spec.endswith(SHARD_EXTS) or _BRACE.search(spec):
            tars = True
        elif Path(spec).is_dir():
            has_tars = bool(_tars_under(Path(spec), None))
            if has_tars and _has_images(Path(spec)):
                raise UsageError(f"{spec}: holds both .tar shards and loose images; encode them in separate runs")
            tars |= has_tars
            loose |= not has_tars
        else:
            loose = True
    if tars and loose:
        raise UsageError("inputs mix tar shards and loose files; give them in separate runs")
    return tars


def discover_shards(inputs: list[str], *, exclude: Path | None = None) -> list[Shard]:
    """The shards named by `inputs` (paths, `{a..b}` ranges, globs, folders), in order, each once. Output names
    are the shards' stems; two shards with one stem are a usage error (their outputs would collide)."""
    exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
    paths: list[Path] = []
    for spec in inputs:
        for one in expand_braces(spec):
            p = Path(one)
            if p.is_dir():
                paths += _tars_under(p, exclude)
            elif not p.exists() and _has_wildcard(one):
                matches = [Path(m) for m in sorted(globlib.glob(one, recursive=True)) if m.endswith(SHARD_EXTS)]
                if not matches:
                    raise UsageError(f"{one}: no .tar file matches this pattern")
                paths += matches
            else:
                paths.append(p)
    shards, seen, names = [], set(), {}
    for p in paths:
        absolute = os.path.abspath(p)
        if absolute in seen:
            continue
        seen.add(absolute)
        name = p.name[:-len(".tar")] if p.name.endswith(".tar") else p.name
        if name in names:
            raise UsageError(f"{names[name]} and {p} would both be written to shard {name}.tar; "
                             "give shards distinct names")
        names[name] = p
        try:
            st = p.stat()
            identity = {"input": absolute, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            identity = {"input": absolute}
        shards.append(Shard(str(p), name, identity, path=p))
    return shards


def group_files(items: list[Item], size: int) -> list[Item]:
    """Loose-file items -> the same items, `size` to a shard (00000, 00001, ...), each with a WebDataset key (its
    path under its input root, without extension; dots in the name become `_`, which the key rule would split at)."""
    if size < 1:
        raise UsageError(f"--shard-size {size}: must be at least 1")
    out = []
    for start in range(0, len(items), size):
        group = items[start:start + size]
        lines = []
        for item in group:
            try:
                st = item.path.stat()
                lines.append(f"{os.path.abspath(item.path)}\t{st.st_size}\t{st.st_mtime_ns}")
            except OSError:
                lines.append(f"{os.path.abspath(item.path)}\t-")
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        shard = Shard(f"{group[0].source} .. {group[-1].source}", f"{start // size:05d}",
                      {"inputs": digest, "count": len(group)}, total=len(group))
        for item in group:
            rel = item.rel if item.rel.parts else PurePosixPath(item.path.name)
            stem = rel.with_suffix("")
            item.key = (stem.parent / stem.name.replace(".", "_")).as_posix()
            item.shard = shard
            out.append(item)
    return out


# --- reading a shard ------------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str] | None:
    """Member name -> (key, extension) by WebDataset's rule; None for a name with no extension."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be used as an output name (None: it is fine)."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return "absolute member name"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "member name with '..'"
    if "\x00" in name:
        return "member name with a NUL byte"
    return None


def _shown(text: str) -> str:
    return json.dumps(text)[1:-1]  # control characters escaped: one line per error


def _wanted_image(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def _wanted_latent(ext: str) -> bool:
    return ext == LATENT_EXT


WANTED = {"image": _wanted_image, "latent": _wanted_latent}


def samples(shard: Shard, wanted: str = "image", *, max_member: int = MAX_MEMBER_BYTES):
    """Stream `shard`'s samples as Items (data = the wanted member's bytes, carried = the others by extension),
    with per-sample and per-shard errors as Items whose `error` is set. Sets shard.total at the end."""
    is_wanted = WANTED[wanted]
    count = 0
    seen: set[str] = set()

    def item(key: str | None, members: dict | None = None, error: str | None = None) -> Item:
        nonlocal count
        count += 1
        where = f"{shard.source}:{_shown(key)}" if key is not None else shard.source
        it = Item(where, shard.path, PurePosixPath(shard.name), key=key, shard=shard, error=error)
        if members is not None and error is None:
            main = next((ext for ext in members if is_wanted(ext)), None)
            if main is None:
                have = ", ".join("." + e for e in members) or "nothing"
                it.error = f"no {wanted} member in this sample (it has {have})"
            else:
                it.data = members.pop(main)
                it.carried = members
        return it

    key, members, bad = None, {}, None   # the sample being gathered; bad: why it cannot be used

    def flush():
        nonlocal key, members, bad
        out = None
        if key is not None:
            if key in seen:
                out = item(key, error="duplicate key: a sample with this key came earlier in the shard")
            else:
                seen.add(key)
                out = item(key, error=bad) if bad else item(key, members)
        key, members, bad = None, {}, None
        return out

    try:
        tar = tarfile.open(shard.path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        reason = "not a tar file" if isinstance(e, tarfile.ReadError) else reason
        yield item(None, error=f"cannot read shard: {reason}")
        shard.total = count
        return
    index = 0
    try:
        with tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it has read: memory would grow with the shard
                index += 1
                if info.isdir():
                    continue
                name = info.name
                split = split_name(name)
                problem = unsafe_name(name)
                if split is None:
                    k, ext = name, ""
                    problem = problem or "member name without an extension (not a WebDataset sample member)"
                else:
                    k, ext = split
                if problem and unsafe_name(k):
                    k = _shown(k)
                if k != key and (out := flush()) is not None:
                    yield out
                key = k
                if bad:
                    continue
                if problem:
                    bad = f"{problem}: {_shown(name)}"
                elif not info.isreg():
                    kind = "link" if info.issym() or info.islnk() else "special file"
                    bad = f"member {_shown(name)} is a {kind}; samples hold regular files only"
                elif info.size > max_member:
                    bad = f"member {_shown(name)} is {info.size} bytes (limit {max_member})"
                elif ext in members:
                    bad = f"member {_shown(name)} appears twice"
                else:
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[ext] = data
            if (out := flush()) is not None:
                yield out
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        if key is not None:
            if key not in seen:
                seen.add(key)
                yield item(key, error="incomplete: the shard breaks off in this sample")
        yield item(None, error=f"shard truncated or corrupt after member {index}: {reason}; "
                               "the samples after it are lost")
    shard.total = count
