"""Help that reads like a normal CLI's: `--json`, not `--json <bool>`; `INPUTS...`, not `{inputs}...` and
`<list[str]>`. Typer prints an option's metavar in place of its type, so flags get an empty one; arguments are
named in upper case in the usage line and get no type column.

Every command and group of the app is made with these classes (`cls=` of typer's command() and Typer()).
"""

import typer.core


def _plain(params) -> None:
    for p in params:
        if p.param_type_name == "option" and getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        elif p.param_type_name == "argument":
            p.metavar = p.metavar or p.name.upper()
            p.display_type_rich = lambda ctx: None   # the name says it; no `<list[str]>` beside it


def _usage(command, ctx) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for p in command.get_params(ctx):
        if p.param_type_name == "argument":
            name = p.metavar + ("..." if p.nargs != 1 else "")
            pieces.append(name if p.required else f"[{name}]")
    return pieces


def _help_option(option):
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


class Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        params = super().get_params(ctx)
        _plain(params)
        return params

    def collect_usage_pieces(self, ctx):
        return _usage(self, ctx)

    def get_help_option(self, ctx):
        return _help_option(super().get_help_option(ctx))


class Group(typer.core.TyperGroup):
    def get_params(self, ctx):   # also the completion options typer adds to the root
        params = super().get_params(ctx)
        _plain(params)
        return params

    def collect_usage_pieces(self, ctx):
        return _usage(self, ctx) + [self.subcommand_metavar]

    def get_help_option(self, ctx):
        return _help_option(super().get_help_option(ctx))
