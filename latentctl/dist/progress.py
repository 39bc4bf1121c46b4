"""Progress records: each process writes its counts into OUT/.latentctl-progress/, `latentctl status OUT/` reads
them all and says where the whole job is (done / total, rate, ETA), however many ranks and reruns wrote them.

One JSON file per process (host-pid-random.json), rewritten atomically at most once a `interval` seconds and
at the end. Counting the whole job from them:
- a job is the files with the same world size and job size (all items of all ranks) as the newest file;
- a rank's done = the fewest items any of its runs found done at its start, plus every ok of its runs, plus the
  failures of its runs nobody reran since (a run that started after another's last record supersedes it);
- the job's rate is the sum over the runs still going of ok / seconds; ETA = what is left / rate (a rank that
  is not running shows its average rate).
"""

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FOLDER = ".latentctl-progress"
STALE = 60.0  # seconds without a record before a run that did not finish counts as gone


@dataclass
class RunProgress:
    rank: int
    world: int
    job_total: int          # items of the whole job (every rank's part)
    total: int              # items of this rank's part
    host: str = ""
    pid: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    by_others: int = 0      # skipped because another run wrote them while this one ran
    started: float = 0.0
    updated: float = 0.0
    finished: bool = False

    @property
    def skipped_at_start(self) -> int:
        return self.skipped - self.by_others


class ProgressWriter:
    """Counts one run's records (add) and keeps its progress file current. claims: to tell skips found at the
    start from items another run wrote meanwhile."""

    def __init__(self, out_dir: Path, rank: int, world: int, job_total: int, total: int, *, claims=None,
                 interval: float = 1.0):
        now = time.time()
        self.state = RunProgress(rank, world, job_total, total, socket.gethostname(), os.getpid(), started=now,
                                 updated=now)
        self.folder = Path(out_dir) / FOLDER
        self.path = self.folder / f"{self.state.host}-{self.state.pid}-{secrets.token_hex(3)}.json"
        self.claims, self.interval, self._written = claims, interval, 0.0
        self.write()

    def add(self, record) -> None:
        s = self.state
        s.ok += record.status == "ok"
        s.skipped += record.status == "skipped"
        s.failed += record.status == "error"
        if time.monotonic() - self._written >= self.interval:
            self.write()

    def write(self) -> None:
        s = self.state
        s.updated = time.time()
        if self.claims is not None:
            s.by_others = self.claims.by_others
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(asdict(s)))
        os.replace(tmp, self.path)
        self._written = time.monotonic()

    def close(self, finished: bool) -> None:
        self.state.finished = finished
        self.write()


def read(out_dir: Path) -> list[RunProgress]:
    runs = []
    for path in sorted((Path(out_dir) / FOLDER).glob("*.json")):
        try:
            runs.append(RunProgress(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # being replaced, or not ours
    return runs


@dataclass
class RankStatus:
    rank: int
    total: int
    done: int
    ok: int
    failed: int
    runs: int
    rate: float             # ok per second: of the runs still going, else of all its runs while they ran
    state: str              # running | finished | stopped (no record for STALE seconds, not finished)


@dataclass
class JobStatus:
    world: int
    total: int
    done: int
    ok: int
    failed: int
    rate: float
    eta: float | None       # seconds; None when nothing runs or the rate is not known yet
    ranks: list[RankStatus] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _rank_status(rank: int, runs: list[RunProgress], now: float) -> RankStatus:
    runs = sorted(runs, key=lambda r: r.started)
    current = [r for r in runs if not any(o.started > r.updated for o in runs)]  # not superseded by a rerun
    total = runs[-1].total
    done = min(r.skipped_at_start for r in runs) + sum(r.ok for r in runs) + sum(r.failed for r in current)
    going = [r for r in current if not r.finished and now - r.updated < STALE]
    rate = sum(r.ok / max(r.updated - r.started, 1e-9) for r in going)
    state = "running" if going else "finished" if all(r.finished for r in current) else "stopped"
    rate = rate if going else sum(r.ok for r in runs) / max(sum(r.updated - r.started for r in runs), 1e-9)
    return RankStatus(rank, total, min(done, total), sum(r.ok for r in runs), sum(r.failed for r in current),
                      len(runs), rate, state)


def summarize(runs: list[RunProgress], now: float | None = None) -> JobStatus | None:
    """The job of the newest progress record, across its ranks and reruns; None when there is none."""
    if not runs:
        return None
    now = time.time() if now is None else now
    newest = max(runs, key=lambda r: r.started)
    job = [r for r in runs if (r.world, r.job_total) == (newest.world, newest.job_total)]
    ranks = [_rank_status(k, [r for r in job if r.rank == k], now) for k in sorted({r.rank for r in job})]
    done = sum(r.done for r in ranks)
    rate = sum(r.rate for r in ranks if r.state == "running")
    left = newest.job_total - done
    running = any(r.state == "running" for r in ranks)
    eta = 0.0 if left <= 0 else (left / rate if running and rate > 0 else None)
    return JobStatus(newest.world, newest.job_total, done, sum(r.ok for r in ranks), sum(r.failed for r in ranks),
                     rate, eta, ranks)
