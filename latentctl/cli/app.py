"""The Typer app and main(): known errors become one line on stderr and an exit code, never a traceback.

Exit codes: 0 ok; 1 some inputs failed (the run went on); 2 usage, model or weights error; 130 interrupted.
"""

import sys

import typer

from .. import __version__
from ..errors import LatentctlError
from . import output
from .help import Command, Group
from .bench_cmd import bench
from .models_cmd import info, models_app
from .pipeline_cmds import decode, encode, roundtrip
from .status_cmd import status
from .verify_cmd import verify

# Shell completion is Typer's own: `latentctl --install-completion` (bash, zsh, fish, PowerShell) or
# `latentctl --show-completion SHELL` to print the script.
app = typer.Typer(name="latentctl", cls=Group, no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False,
                  help="Images to VAE latents and back, fast and exactly. "
                       "encode | decode | roundtrip | verify | bench | status | models | info")
app.add_typer(models_app, name="models")
for name, fn in (("info", info), ("encode", encode), ("decode", decode), ("roundtrip", roundtrip), ("bench", bench),
                 ("verify", verify), ("status", status)):
    app.command(name, cls=Command)(fn)


def _version(value: bool):
    if value:
        print(f"latentctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="latentctl", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        code = 130
    except typer.TyperException as e:  # bad flags, missing arguments (Typer's usage errors)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        output.error((message.splitlines() or [""])[0] + "  (see --help)")
        code = getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        output.error("interrupted")
        code = 130
    except LatentctlError as e:
        output.error(str(e))
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
