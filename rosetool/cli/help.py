"""How commands look in `--help`: usage as `SRC DST`, no `<bool>` tags on flags, an example under each.

Typer 0.29 prints required arguments as `{src}` and tags every flag `<bool>`; both read as noise to a
new user, so the command classes below rewrite the usage line and blank the flags' type column.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

CONTEXT = {"help_option_names": ["-h", "--help"]}


class _Readable:
    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []  # type: ignore[attr-defined]
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "").upper() + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
        if isinstance(self, TyperGroup):
            pieces.append(self.subcommand_metavar)
        return pieces


class Command(_Readable, TyperCommand):
    pass


class Group(_Readable, TyperGroup):
    pass


def examples(*lines: str) -> dict[str, Any]:
    """Keyword arguments for `app.command(...)`: the readable class and an `Examples:` epilog."""
    return {"cls": Command, "epilog": "Examples:  " + "  ·  ".join(lines)}


def sub_app(help: str, **kwargs: Any) -> typer.Typer:
    """A sub-command group that prints its help when called bare and takes `-h`."""
    return typer.Typer(help=help, cls=Group, no_args_is_help=True, context_settings=CONTEXT, **kwargs)
