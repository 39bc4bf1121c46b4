"""`latentctl status OUT/`: where the job writing into OUT/ is, across all its ranks (latentctl/dist/progress.py)."""

from pathlib import Path

import typer

from ..dist import progress
from ..errors import UsageError
from . import options as opt
from . import output


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def status(out: Path = typer.Argument(..., help="The output folder of an encode/decode run (running or done)."),
           json: bool = opt.Json):
    """Done / total, rate and ETA of the job writing into OUT/, summed over its ranks (and reruns)."""
    if not out.is_dir():
        raise UsageError(f"{out}: not a folder")
    job = progress.summarize(progress.read(out))
    if job is None:
        raise UsageError(f"{out}: no progress records (written by encode/decode into {progress.FOLDER}/)")
    if json:
        output.json_line(job.to_dict())
        return
    rows = [[f"{r.rank}/{job.world}", f"{r.done}/{r.total}", r.ok, r.failed, r.runs, f"{r.rate:.2f}", r.state]
            for r in job.ranks]
    output.table(f"{out}", ["rank", "done", "ok", "failed", "runs", "images/s", "state"], rows)
    missing = job.world - len(job.ranks)
    pct = 100 * job.done / job.total if job.total else 100.0
    print(f"job: {job.done}/{job.total} done ({pct:.1f}%), {job.failed} failed, {job.rate:.2f} images/s, "
          f"ETA {_duration(job.eta)}" + (f"; {missing} of {job.world} ranks have not reported" if missing else ""))
