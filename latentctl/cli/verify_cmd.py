"""`latentctl verify OUT/`: every latent loads, is finite, has its metadata's shape, and agrees with the shard
stats and the index. One `error: WHERE: reason` line per problem on stderr; exit 1 on any problem."""

from pathlib import Path

import typer

from ..errors import UsageError
from ..pipeline.verify import verify as verify_folder
from . import options as opt
from . import output


def verify(out: Path = typer.Argument(..., help="The folder encode wrote (latent files or shards)."),
           sources: bool = typer.Option(False, "--sources", help="Also check that each latent's source image "
                                        "still has the sha256 recorded when it was encoded (reads every source)."),
           json: bool = opt.Json, quiet: bool = opt.Quiet):
    """Check a latent cache before training on it: counts on stderr, --json rows on stdout, exit 1 on a problem."""
    if not out.is_dir():
        raise UsageError(f"{out}: not a folder")
    report = verify_folder(out, check_sources=sources)
    if json:
        for row in report.checked:
            output.json_line(row)
    for where, reason in report.problems:
        output.error(f"{where}: {reason}")
    if report.shards == 0 and report.files == 0:
        output.error(f"{out}: no latents here (no .tar shards, no .safetensors files)")
        raise typer.Exit(1)
    output.info(f"verify: {report.ok} latents ok in {report.shards} shards and {report.files} files; "
                f"{len(report.problems)} problems", quiet)
    raise typer.Exit(1 if report.problems else 0)
