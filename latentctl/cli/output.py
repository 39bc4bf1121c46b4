"""The only module that imports rich: results to stdout, diagnostics and progress to stderr."""

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True, highlight=False)


def one_line(text: str) -> str:
    """text with control characters escaped (\\n, \\t, \\x1b; undecodable file-name bytes as \\xNN), so that
    any file name stays on one line and cannot drive the terminal."""
    out = []
    for c in text:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or 0x7F <= o < 0xA0 or c in "\u2028\u2029":
            out.append(c.encode("unicode_escape").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)


def error(message: str) -> None:
    """One line `error: ...` on stderr (the format scripts grep for)."""
    message = one_line(message)
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True) if err.is_terminal else \
        print(f"error: {message}", file=sys.stderr, flush=True)


def warning(message: str) -> None:
    message = one_line(message)
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True) if err.is_terminal else \
        print(f"warning: {message}", file=sys.stderr, flush=True)


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def json_line(obj: dict) -> None:
    """One JSON object per line on stdout, flushed, for pipelines."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _cell(value) -> str:
    """A table cell on one line: tabs and line breaks (possible in file names) written as escapes."""
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def table(title: str, columns: list[str], rows: list[list], to_stdout: bool = True) -> None:
    """A table on a terminal (cells wrap, never cut); tab-separated lines with a header row when the stream is not
    a terminal (piped or redirected: every path and hash whole, one row per line; --json stays the machine format)."""
    stream = sys.stdout if to_stdout else sys.stderr
    if not (stream.isatty() if hasattr(stream, "isatty") else False):
        if not to_stdout:   # diagnostics for a reader (bench): the title says what was measured
            stream.write(title + "\n")
        stream.write("\t".join(columns) + "\n")
        for r in rows:
            stream.write("\t".join(_cell(x) for x in r) + "\n")
        stream.flush()
        return
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    (Console(highlight=False) if to_stdout else err).print(t)


def progress(total: int, description: str, quiet: bool = False) -> Progress | None:
    """A progress bar on stderr, only when stderr is a terminal; never touches stdout (redirect off)."""
    if quiet or not err.is_terminal:
        return None
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=err, redirect_stdout=False, redirect_stderr=False, transient=False)
    p.add_task(description, total=total)
    return p
