"""The `rosetool` command: sub-apps and commands, and the one place errors become one-liners."""

from __future__ import annotations

import os
import sys

import click
import typer

from ..errors import RosetoolError
from . import bench, convert, demo, generate, inspect, mappings, megatron, verify
from .help import CONTEXT, Group, examples
from .output import err, quiet_libraries

app = typer.Typer(help="Convert, verify, export and benchmark LLM checkpoints (HF, Megatron, native).",
                  cls=Group, context_settings=CONTEXT, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version
        typer.echo(f"rosetool {version('rosetool')}")
        raise typer.Exit()


@app.callback()
def root(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit.")) -> None:
    quiet_libraries()


app.add_typer(convert.app, name="convert")
app.add_typer(mappings.app, name="mappings")
app.command("export-hf", **examples("rosetool export-hf ./megatron-ckpt ./hf-out --tokenizer ./tokenizer",
                                    "rosetool export-hf ./native ./hf-out --dtype bfloat16"))(convert.export_hf)
app.command("inspect", **examples("rosetool inspect ./gpt2", "rosetool inspect ./megatron-ckpt --json"))(inspect.inspect)
app.command("verify", **examples("rosetool verify ./gpt2 ./gpt2-bf16",
                                 "rosetool verify ./gpt2 ./native --atol 1e-3"))(verify.verify)
app.command("demo", **examples("rosetool demo", "rosetool demo --workdir ./demo-out"))(demo.demo)
app.command("generate", **examples('rosetool generate "Hello world"',
                                   'rosetool generate ./native "Once upon a time" --temperature 0'))(generate.generate)
app.command("reshard", **examples("rosetool reshard ./mcore-tp1 ./mcore-tp2 --tp 2"))(megatron.reshard)
app.add_typer(bench.app, name="bench")
convert.app.command("hf-to-megatron", **examples("rosetool convert hf-to-megatron ./llama ./mcore --tp 2 --pp 2",
                                                 "rosetool convert hf-to-megatron ./llama ./mcore --format torch_dist"))(
    megatron.hf_to_megatron)
convert.app.command("megatron-to-hf", **examples("rosetool convert megatron-to-hf ./mcore ./hf-out --tokenizer ./llama"))(
    megatron.megatron_to_hf)


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
