"""decode with the model each latent file records: chosen per file, files grouped by model, each model loaded once.

For a latentctl latent file the candidates are, in order: the models.toml entry of its recorded `model` (with that
entry's weights, when they are on this machine), the recorded `weights` path, then the `fallback` weights
(`--weights`). The first whose sha256 is the recorded `weights_sha256` is used. Files by other tools (no latentctl
metadata) take the fallback, else the default model. A file that no candidate fits is that file's error line; the
other files decode, group after group.
"""

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, LatentctlError, WeightsError
from ..registry import find_weights, load_registry, sha256_file
from . import latents
from .inputs import Item
from .run import Options, Record, Summary, decode_files


@dataclass(frozen=True)
class Choice:
    """What to load for a group of files: api.load(model, weights=weights)."""

    model: str | None       # a models.toml name (its settings and, without `weights`, its weights)
    weights: str | None     # a weights file or folder

    def label(self) -> str:
        return self.weights if self.model is None else self.model if self.weights is None \
            else f"{self.model} ({self.weights})"


def _sha(path: Path) -> str | None:
    try:
        return sha256_file(path) if path.is_file() else None
    except OSError:
        return None


def choose(meta: dict[str, str], *, fallback: str | Path | None = None, registry: dict | None = None,
           models_file=None) -> Choice:
    """The model for one file's metadata (see the module docstring); InputError when none fits."""
    if not meta.get("format", "").startswith("latentctl-latent/"):
        return Choice(None, str(fallback)) if fallback is not None else Choice("default", None)
    registry = registry if registry is not None else load_registry(models_file)
    name, recorded, sha = meta.get("model", ""), meta.get("weights", ""), meta.get("weights_sha256", "")
    named = name if name in registry else None
    looked = []
    if named is not None:
        entry = registry[named]
        try:
            path = find_weights(entry)
        except WeightsError:
            path = None
            looked.append(f"model {named!r}: weights not on this machine")
        if path is not None:
            if not sha or (entry.sha256 or _sha(path)) == sha:
                return Choice(named, None)
            looked.append(f"model {named!r}: {path} is other weights")
    for label, path in (("recorded weights", recorded), ("--weights", fallback)):
        if not path or path == "random":
            continue
        path = Path(path)
        if not path.exists():
            looked.append(f"{label} {path}: no such file")
        elif not sha or _sha(path) in (sha, None):   # a folder has no single file hash: taken as is
            return Choice(named, str(path))
        else:
            looked.append(f"{label} {path}: other weights (sha256 {_sha(path)[:12]}…)")
    what = f"written by model {name!r} (weights sha256 {sha[:12]}…)" if sha else f"written by model {name!r}"
    raise InputError(f"{what}, which is not on this machine ({'; '.join(looked) or 'nothing recorded'}); pass "
                     "--weights PATH to its weights, or --model NAME to decode with another model")


def group(items: list[Item], *, fallback=None, models_file=None) -> tuple[dict[Choice, list[Item]], list]:
    """({choice: its items, in input order}, [(item, error message)]) from each file's metadata header."""
    registry = load_registry(models_file)
    groups: dict[Choice, list[Item]] = {}
    errors = []
    for item in items:
        try:
            if item.error is not None:
                raise InputError(item.error)
            meta, _ = latents.read_metadata(item.path)
            groups.setdefault(choose(meta, fallback=fallback, registry=registry), []).append(item)
        except InputError as e:
            errors.append((item, str(e)))
    return groups, errors


def decode_by_model(items: list[Item], options: Options, load, *, decode=decode_files, fallback=None,
                    models_file=None, report=None, warn=None, stop: threading.Event | None = None,
                    **extra) -> Summary:
    """`decode` (run.decode_files or the like) for files written by several models: `load(model, weights)` ->
    (vae, info) once per group, then decode(vae, info, the group's items, ...); `extra` (claims, sink) goes to it."""
    started = time.perf_counter()
    stop = stop if stop is not None else threading.Event()
    summary = Summary(total=len(items))

    def fail(item: Item, message: str) -> None:
        summary.failed += 1
        if report is not None:
            report(Record(item.source, str(item.output) if item.output else None, "error", message))

    groups, errors = group(items, fallback=fallback, models_file=models_file)
    for item, message in errors:
        fail(item, message)
    for choice, members in groups.items():
        if stop.is_set() or (options.fail_fast and summary.failed):
            break
        try:
            vae, info = load(choice.model, choice.weights)
        except LatentctlError as e:   # this group's model cannot be loaded: its files fail, the others go on
            for item in members:
                fail(item, f"cannot load {choice.label()}: {e}")
            continue
        part = decode(vae, info, members, options, report=report, warn=warn, stop=stop, **extra)
        summary.ok, summary.skipped, summary.failed = (summary.ok + part.ok, summary.skipped + part.skipped,
                                                       summary.failed + part.failed)
    summary.interrupted = stop.is_set() and summary.ok + summary.skipped + summary.failed < summary.total
    summary.seconds = time.perf_counter() - started
    return summary
