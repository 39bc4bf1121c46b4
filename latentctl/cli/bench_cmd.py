"""`latentctl bench`: images/s, memory and GFLOP/s per attention backend, size, batch and dtype."""

from pathlib import Path
from typing import Optional

import typer

from .. import api, bench as benchlib
from ..errors import BackendUnavailable, UsageError
from ..modules.attention import check_backend
from . import options as opt
from . import output


def _list(value: str, flag: str, cast=str) -> list:
    try:
        items = [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected a comma-separated list of numbers") from None
    if not items:
        raise UsageError(f"{flag}: give at least one value")
    return items


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"  # keeps the column narrow enough for 80 columns


def bench(
    model: Optional[str] = opt.Model,
    weights: Optional[Path] = opt.Weights,
    random_weights: bool = typer.Option(False, "--random-weights",
                                        help="Build the named model's architecture with random weights "
                                             "(timings and FLOPs do not depend on the values)."),
    models: Optional[Path] = opt.ModelsFile,
    attn: str = typer.Option("sdpa", "--attn", help="Comma-separated attention backends: sdpa, xformers (CUDA), "
                                                    "linear (O(N); an approximation on ordinary checkpoints). "
                                                    "Unavailable ones are reported and skipped."),
    size: str = typer.Option("256", "--size", help="Comma-separated square image sizes in pixels, e.g. 256,512."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes, e.g. 1,4."),
    dtype: str = typer.Option("auto", "--dtype", help="Comma-separated: auto, fp32, bf16, fp16. auto is the "
                                                      "precision encode/decode would pick here."),
    what: str = typer.Option("encode,decode", "--what", help="encode, decode or both."),
    memory_format: str = typer.Option("auto", "--memory-format",
                                      help="Comma-separated: auto, contiguous, channels_last (weights and inputs). "
                                           "auto is the layout encode/decode use here (on a CPU: NCHW for "
                                           "fp32 with NNPACK, else channels_last)."),
    device: str = opt.Device,
    repeat: int = typer.Option(3, "--repeat", help="Timed runs after one warm-up; the median is reported."),
    vs: Optional[str] = typer.Option(None, "--vs", help="'diffusers': run diffusers' AutoencoderKL (its default "
                                                        "attention) on the same weights, interleaved with ours, and "
                                                        "report diffusers' time / ours on each row."),
    json: bool = opt.Json,
):
    """Time encode/decode; a table on stderr, and with --json one JSON object per row on stdout."""
    if vs not in (None, "diffusers"):
        raise UsageError(f"--vs {vs!r}: only 'diffusers' is supported")
    attns = _list(attn, "--attn")
    dev = api.resolve_device(device)
    # Check backends before loading anything: a run where none can work stops here with one line.
    reasons = []
    for a in attns:
        try:
            check_backend(a, dev)
        except BackendUnavailable as e:
            reasons.append(str(e))
    if len(reasons) == len(attns):
        raise BackendUnavailable("; ".join(reasons))
    vae, info = api.load(model, weights=weights, device=str(dev), models_file=models, random_weights=random_weights)
    shown = []

    def on_row(row):
        if json:
            output.json_line(row)
        if row["status"] == "ok":
            shown.append(row)
        else:
            what_failed = " ".join(f"{k}={row[k]}" for k in ("what", "attn", "dtype", "size", "batch") if row[k])
            output.warning(f"{row['status']}: {what_failed}: {row['reason']}")

    rows = benchlib.run(vae, whats=_list(what, "--what"), attns=attns, dtypes=_list(dtype, "--dtype"),
                        sizes=_list(size, "--size", int), batches=_list(batch, "--batch", int),
                        memory_formats=_list(memory_format, "--memory-format"), repeat=repeat,
                        vs_diffusers=vs == "diffusers", model_name=info.name, on_row=on_row,
                        on_warning=output.warning)
    if not shown:
        raise UsageError("nothing could be benchmarked (see the warnings above)")
    _show_table(shown, info, repeat, bool(vs))
    if any(r["status"] == "error" for r in rows):
        raise typer.Exit(1)


def _cell(row: dict, key: str):
    if key == "mode":  # dtype, plus "cl" for channels_last
        return row["dtype"] + (" cl" if row["memory_format"] == "channels_last" else "")
    return row[key]


def _show_table(rows: list[dict], info, repeat: int, vs: bool) -> None:
    """Rich table on stderr. Only what differs between rows gets a column, the rest goes in the title, so the
    table fits 80 columns; min-max and the other fields are in the --json rows."""
    keys = [k for k in ("what", "attn", "mode", "size", "batch") if len({_cell(r, k) for r in rows}) > 1]
    fixed = [f"{k} {rows[0][k]}" for k in ("what", "attn", "size", "batch") if k not in keys]
    modes = sorted({f"{r['dtype']} {r['memory_format']}" for r in rows})
    title = (f"latentctl bench: {info.name} ({info.weights}) on {rows[0]['device']}, {rows[0]['threads']} threads, "
             f"median of {repeat}; mode: {', '.join(modes)}" + (f"; {', '.join(fixed)}" if fixed else ""))
    cols = keys + ["img/s", "ms/img", "peak MB", "GFLOP/s"] + (["vs diffusers", "|diff|"] if vs else [])
    table = []
    for r in rows:
        line = [_cell(r, k) for k in keys]
        line += [_fmt(r["images_per_s"], 2), _ms(r["ms_per_image"]), _fmt(r["peak_mem_mb"], 0), _fmt(r["gflops"])]
        if vs:
            diff = r["diffusers_max_abs_diff"]
            line += [f"{_fmt(r['vs_diffusers'], 2)}x", "-" if diff is None else f"{diff:.0e}"]
        table.append(line)
    output.table(title, cols, table, to_stdout=False)
