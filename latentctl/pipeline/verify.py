"""`latentctl verify OUT/`: prove a latent cache is complete before training on it.

Every latent under OUT, in shards (NAME.tar) or files (*.safetensors), is read and checked: it loads, it is
finite, its shape is what its metadata says (padded size / factor); each shard agrees with its NAME_stats.json
(done, and as many latents as it says were ok); the index (OUT/index.parquet) lists exactly those latents, and
its offset/size point at each shard member's bytes. With sources=True each latent's source must still have the
sha256 recorded when it was encoded. Nothing is written.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ..errors import InputError
from . import index as index_mod
from . import latents, sources


@dataclass
class Report:
    shards: int = 0
    files: int = 0
    ok: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)   # (where, reason), one line each
    checked: list[dict] = field(default_factory=list)              # one row per latent: where, status, error

    def problem(self, where: str, reason: str) -> None:
        self.problems.append((where, reason))


def _expected_shape(meta: dict) -> tuple[int, int] | None:
    """(h, w) of the latent from the metadata's padded size and factor; None when the metadata does not say."""
    try:
        width, height = (int(v) for v in meta["padded"].split("x"))
        factor = int(meta["factor"])
    except (KeyError, ValueError):
        return None
    return height // factor, width // factor


def _load(data: bytes | Path) -> tuple[torch.Tensor, dict]:
    """The `latent` tensor as stored ((C, h, w), or (T, C, h, w) for a clip) and the metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        if isinstance(data, bytes):
            meta, tensors = latents.header(data)[0], load(data)
        else:
            with safe_open(str(data), "pt") as f:
                meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"not a readable safetensors file (truncated or corrupt?): {e}") from None
    if "latent" not in tensors:
        raise InputError(f"no tensor 'latent' (it has {', '.join(tensors) or 'none'})")
    return tensors["latent"], meta


def check_latent(data: bytes | Path) -> tuple[dict, list[int]]:
    """(metadata, shape) of a good latent; raises InputError with the reason otherwise."""
    latent, meta = _load(data)
    if latent.ndim not in (3, 4):
        raise InputError(f"latent has shape {tuple(latent.shape)}; expected (C, h, w) or (T, C, h, w)")
    if not bool(torch.isfinite(latent).all()):
        bad = int((~torch.isfinite(latent)).sum())
        raise InputError(f"{bad} of {latent.numel()} latent values are NaN/inf")
    expected = _expected_shape(meta)
    if expected is not None and tuple(latent.shape[-2:]) != expected:
        raise InputError(f"latent is {tuple(latent.shape)}; its metadata (padded {meta['padded']}, factor "
                         f"{meta['factor']}) says (.., {expected[0]}, {expected[1]})")
    return meta, list(latent.shape)


def _index_rows(out_dir: Path, report: Report) -> list[dict] | None:
    path = out_dir / index_mod.NAME
    if not path.exists():
        return None
    try:
        return [r for r in index_mod.read(path) if r["status"] == "ok"]
    except Exception as e:
        report.problem(str(path), f"unreadable index: {e}")
        return None


def _check_shard(out_dir: Path, tar: Path, rows: list[dict] | None, report: Report, seen_sources: list) -> None:
    name = tar.name[:-len(".tar")]
    report.shards += 1
    shard = sources.Shard(str(tar), name, {}, path=tar)
    digests, ok = {}, 0
    for item in sources.samples(shard, "latent"):
        where = item.source
        if item.error is not None:
            report.problem(where, item.error)
            report.checked.append({"where": where, "status": "error", "error": item.error})
            continue
        try:
            meta, shape = check_latent(item.data)
        except InputError as e:
            report.problem(where, str(e))
            report.checked.append({"where": where, "status": "error", "error": str(e)})
            continue
        ok += 1
        digests[f"{item.key}.{sources.LATENT_EXT}"] = hashlib.sha256(item.data).hexdigest()
        seen_sources.append((where, meta))
        report.checked.append({"where": where, "status": "ok", "error": None, "shape": shape})
    report.ok += ok
    stats_file = out_dir / f"{name}_stats.json"
    try:
        stats = json.loads(stats_file.read_text())
        if stats.get("status") != "done":
            report.problem(str(stats_file), f"status {stats.get('status')!r}, not done")
        elif stats.get("ok") != ok:
            report.problem(str(tar), f"{ok} good latents, but its stats say {stats.get('ok')} were written")
    except FileNotFoundError:
        report.problem(str(tar), f"no {stats_file.name}: the shard was not finished by latentctl")
    except (OSError, ValueError) as e:
        report.problem(str(stats_file), f"unreadable: {e}")
    if rows is None:
        return
    mine = [r for r in rows if r["path"] == tar.name]
    listed = {r["member"] for r in mine}
    for member in sorted(set(digests) - listed):
        report.problem(f"{tar}:{member}", "not in index.parquet")
    with open(tar, "rb") as f:
        for r in mine:
            if r["member"] not in digests:
                report.problem(f"{tar}:{r['member']}", "listed in index.parquet, but not a good latent in the shard")
                continue
            f.seek(r["offset"] or 0)
            if hashlib.sha256(f.read(r["size"] or 0)).hexdigest() != digests[r["member"]]:
                report.problem(f"{tar}:{r['member']}", "index.parquet's offset/size do not point at its bytes")


def _latent_files(out_dir: Path):
    for path in sorted(out_dir.rglob("*.safetensors")):
        if not any(part.startswith(".") for part in path.relative_to(out_dir).parts):
            yield path


def _check_sources(seen: list, report: Report) -> None:
    """Each latent's source (a file, or SHARD.tar:KEY) still has the recorded sha256."""
    by_shard: dict[str, list] = {}
    for where, meta in seen:
        source, want = meta.get("source", ""), meta.get("source_sha256", "")
        if not source or not want:
            report.problem(where, "no source/source_sha256 in its metadata")
            continue
        shard_path, _, key = source.rpartition(".tar:")
        if shard_path and key:
            by_shard.setdefault(shard_path + ".tar", []).append((where, key, want))
            continue
        try:
            got = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        except OSError as e:
            report.problem(where, f"source {source}: {e.strerror or e}")
            continue
        if got != want:
            report.problem(where, f"source {source} has changed since it was encoded (sha256 differs)")
    for shard_path, wanted in by_shard.items():
        got = {}
        shard = sources.Shard(shard_path, PurePosixPath(shard_path).stem, {}, path=Path(shard_path))
        for item in sources.samples(shard, "image"):
            if item.data is not None:
                got[item.key] = hashlib.sha256(item.data).hexdigest()
        for where, key, want in wanted:
            if got.get(key) != want:
                report.problem(where, f"source {shard_path}:{key} is missing or has changed since it was encoded")


def verify(out_dir, *, check_sources: bool = False) -> Report:
    """Check every latent under out_dir; the Report lists each problem as (where, reason)."""
    out_dir = Path(out_dir)
    report, seen, clips = Report(), [], set()
    rows = _index_rows(out_dir, report)
    tars = sorted(p for p in out_dir.glob("*.tar") if not p.name.startswith("."))
    files = list(_latent_files(out_dir))
    if rows is None and (tars or files) and not (out_dir / index_mod.NAME).exists():
        report.problem(str(out_dir), "no index.parquet (the run that wrote these did not finish, or predates it)")
    for tar in tars:
        _check_shard(out_dir, tar, rows, report, seen)
    for path in files:
        report.files += 1
        try:
            meta, shape = check_latent(path)
        except InputError as e:
            report.problem(str(path), str(e))
            report.checked.append({"where": str(path), "status": "error", "error": str(e)})
            continue
        report.ok += 1
        if meta.get("kind") == "clip":
            clips.add(path.relative_to(out_dir).as_posix())  # clips are not in the index (one row per image)
        seen.append((str(path), meta))
        report.checked.append({"where": str(path), "status": "ok", "error": None, "shape": shape})
    if rows is not None:
        on_disk = {p.relative_to(out_dir).as_posix() for p in files} - clips
        listed = {r["path"] for r in rows if r["shard"] is None}
        for path in sorted(on_disk - listed):
            report.problem(str(out_dir / path), "not in index.parquet")
        for path in sorted(listed - on_disk):
            report.problem(str(out_dir / path), "listed in index.parquet, but missing")
    if check_sources:
        _check_sources(seen, report)
    return report
