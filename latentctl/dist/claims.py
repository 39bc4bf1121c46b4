"""Runs that share an output folder split the work: an item is done by whoever claims it first.

A claim is a hidden file beside the item's output (`.NAME.latentctl-claim`), created with O_CREAT|O_EXCL, which
the filesystem grants to exactly one process. Its holder touches it every ttl/4 seconds (a heartbeat thread) and
removes it once the output is renamed into place (or the item failed). A claim whose mtime is older than `ttl`
belongs to a dead run and is taken over: under a second O_EXCL file (`…-claim.break`), so two runs cannot both
take it. An item claimed by a live run is put aside and looked at again once this run's own items are done:
by then it is either done (skipped) or free (done here), so every run ends with the whole list done.
"""

import os
import socket
import threading
import time
import uuid
from pathlib import Path

CLAIM_SUFFIX = ".latentctl-claim"


def claim_path(output: Path) -> Path:
    return output.with_name(f".{output.name}{CLAIM_SUFFIX}")


class Claims:
    """The claims one run holds. `take(items)` yields the items this run should do, claimed."""

    def __init__(self, ttl: float = 60.0, poll: float = 0.2):
        self.ttl, self.poll = ttl, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: dict[Path, Path] = {}       # output -> claim file
        self.deferred: list = []               # items another live run held when we reached them
        self.by_others = 0                     # items found done by another run after this run started
        self.started = time.time()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._beat = None

    # --- one claim -------------------------------------------------------------------------------------------
    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.owner + "\n")
        return True

    def _stale(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime > self.ttl
        except FileNotFoundError:
            return True

    def _take_over(self, path: Path) -> bool:
        """Replace a claim nobody has touched for ttl seconds by ours; only one run can do it at a time."""
        breaker = path.with_name(path.name + ".break")
        if not self._create(breaker):
            if not self._stale(breaker):
                return False
            breaker.unlink(missing_ok=True)  # a run that died while taking over
            return False
        try:
            if not self._stale(path):
                return False
            path.unlink(missing_ok=True)
            return self._create(path)
        finally:
            breaker.unlink(missing_ok=True)

    def acquire(self, output: Path) -> bool:
        path = claim_path(output)
        try:
            got = self._create(path) or (self._stale(path) and self._take_over(path))
        except FileNotFoundError:  # the output's folder does not exist yet
            path.parent.mkdir(parents=True, exist_ok=True)
            got = self._create(path)
        if got:
            with self._lock:
                self.held[output] = path
            self._start_heartbeat()
        return got

    def release(self, output: Path) -> None:
        with self._lock:
            path = self.held.pop(output, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def busy(self, output: Path) -> bool:
        """Claimed by a run that is still alive."""
        path = claim_path(output)
        return path.exists() and not self._stale(path)

    # --- heartbeat ---------------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="latentctl-claims", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stopped.wait(self.ttl / 4):
            with self._lock:
                paths = list(self.held.values())
            for path in paths:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat and drop every claim still held (an interrupted run's items are free again)."""
        self._stopped.set()
        with self._lock:
            paths, self.held = list(self.held.values()), {}
        for path in paths:
            path.unlink(missing_ok=True)

    # --- the items of a run ------------------------------------------------------------------------------------
    def done_elsewhere(self, item, check, overwrite: bool) -> bool:
        """After claiming: did another run finish this output meanwhile? (With --overwrite only outputs
        written since this run started count, older ones are to be redone.)"""
        out = item.output
        try:
            if not out.exists() or check is None or check(item)[0] != "done":
                return False
            return not overwrite or out.stat().st_mtime >= self.started
        except OSError:
            return False

    def take(self, items, check, overwrite: bool, skipped):
        """The items to do, each claimed as it is reached (so runs started together interleave). Items held by a
        live run go to self.deferred; items another run finished meanwhile go to skipped(item)."""
        for item in items:
            if item.output is None or item.error is not None:
                yield item
            elif not self.acquire(item.output):
                self.deferred.append(item)
            elif self.done_elsewhere(item, check, overwrite):
                self.release(item.output)
                self.by_others += 1
                skipped(item)
            else:
                yield item

    def wait_deferred(self, halted) -> list:
        """Block until a put-aside item is free (its claim released or expired); return all of them for another
        round (an item still held is put aside again there). [] when nothing was put aside or `halted()`."""
        items, self.deferred = self.deferred, []
        while items and not halted():
            if any(not self.busy(item.output) for item in items):
                return items
            time.sleep(self.poll)
        return []
