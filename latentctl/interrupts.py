"""SIGINT and SIGTERM for the command-line process (the library never installs handlers).

Before a run starts (imports, model loading, planning) nothing is being written, so a signal ends the process at
once: one line on stderr, exit 128 + signal (130 for Ctrl-C, 143 for SIGTERM), no traceback, whatever import or
C call was in progress. During a run the first signal sets the run's stop Event (the writes in flight finish,
within seconds) and the CLI exits 130/143; a second one abandons them and ends the process at once (a temporary
file it leaves is removed by the next run). Imports nothing but os and signal, so `latentctl.__main__` can
install the handlers before anything heavy is imported.
"""

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_run = {"stop": None, "caught": []}


def _exit_now(signum: int) -> None:
    try:
        os.write(2, b"error: interrupted\n")
    finally:
        os._exit(128 + signum)


def _handler(signum, frame) -> None:
    stop, caught = _run["stop"], _run["caught"]
    if stop is not None and not caught:
        caught.append(signum)
        stop.set()
        return
    _exit_now(signum)


def install() -> None:
    """From here on, SIGINT/SIGTERM end the process at once (or stop the run in progress, see during_run)."""
    for s in SIGNALS:
        signal.signal(s, _handler)


class during_run:
    """with during_run(stop) as caught: the first SIGINT/SIGTERM sets `stop` and is appended to `caught`; a second
    one ends the process. Only in the main thread (elsewhere signals cannot be handled): then a no-op."""

    def __init__(self, stop):
        self.stop, self.previous = stop, {}

    def __enter__(self) -> list:
        import threading

        _run["stop"], _run["caught"] = self.stop, []
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, _handler) for s in SIGNALS}
        return _run["caught"]

    def __exit__(self, *exc) -> None:
        _run["stop"] = None
        for s, h in self.previous.items():
            signal.signal(s, h)
