"""The `rosetool` command: sub-apps and commands, and the one place errors become one-liners."""

from __future__ import annotations

import os
import sys

import click
import typer

from ..errors import RosetoolError
from . import bench, convert, demo, generate, inspect, mappings, megatron, verify
from .output import err
from . import serve

app = typer.Typer(help="Convert, verify, export and benchmark LLM checkpoints (HF, Megatron, native).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(convert.app, name="convert")
app.add_typer(mappings.app, name="mappings")
app.command("export-hf")(convert.export_hf)
app.command("inspect")(inspect.inspect)
app.command("verify")(verify.verify)
app.command("demo")(demo.demo)
app.command("generate")(generate.generate)
app.command("reshard")(megatron.reshard)
app.add_typer(bench.app, name="bench")
app.command("serve")(serve.serve)
convert.app.command("hf-to-megatron")(megatron.hf_to_megatron)
convert.app.command("megatron-to-hf")(megatron.megatron_to_hf)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user mistakes print `Error: ...` on one line and exit 2 (ROSETOOL_DEBUG=1: traceback)."""
    try:
        code = app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        err.print("Aborted.")
        code = 130
    except RosetoolError as exc:
        if os.environ.get("ROSETOOL_DEBUG"):
            raise
        err.print(f"[red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        code = 2
    sys.exit(code or 0)
