"""The `rosetool` command: sub-apps and commands, and the one place errors become one-liners."""

from __future__ import annotations

import os
import sys
import warnings

import click
import typer
import typer._click.exceptions as typer_click
from rich.markup import escape

from ..errors import RosetoolError, RosetoolWarning
from . import bench, convert, demo, generate, inspect, mappings, megatron, verify
from . import serve
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
app.command("serve", **examples("rosetool serve", "rosetool serve ./native --port 8000 --chat-template ./chat.jinja"))(serve.serve)
convert.app.command("hf-to-megatron", **examples("rosetool convert hf-to-megatron ./llama ./mcore --tp 2 --pp 2",
                                                 "rosetool convert hf-to-megatron ./llama ./mcore --format torch_dist"))(
    megatron.hf_to_megatron)
convert.app.command("megatron-to-hf", **examples("rosetool convert megatron-to-hf ./mcore ./hf-out --tokenizer ./llama"))(
    megatron.megatron_to_hf)

# typer 0.29 raises its bundled click's exceptions; plain click's are caught too for code that raises them.
_EXITS = (typer.Exit, click.exceptions.Exit)
_ABORTS = (typer.Abort, click.exceptions.Abort)
_CLICK_ERRORS = (typer_click.ClickException, click.ClickException)
_USAGE_ERRORS = (typer_click.UsageError, click.UsageError)


def _one_line(exc: BaseException) -> str:
    """An OSError names its file and reason, not its errno tuple; nothing spans two lines."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
        text = f"{' -> '.join(names)}: {exc.strerror}" if names else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; nothing but one line ever reaches the user (ROSETOOL_DEBUG=1: tracebacks).

    Usage mistakes print click's usage block and exit 2, input and OS errors `Error: ...` and exit 2,
    anything else is a bug: `Error: internal error ...`, exit 1. Library warnings (torch's) are
    noise to a user and are silenced; rosetool's own warnings print one line each.
    """
    debug = bool(os.environ.get("ROSETOOL_DEBUG"))
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("always", RosetoolWarning)
        warnings.showwarning = _show_warning
        code = _run(argv, debug)
    sys.exit(code or 0)


def _run(argv: list[str] | None, debug: bool) -> int:
    try:
        return app(args=argv, standalone_mode=False) or 0
    except _EXITS as exc:
        return exc.exit_code
    except _CLICK_ERRORS as exc:
        exc.show()
        return 2 if isinstance(exc, _USAGE_ERRORS) else exc.exit_code
    except _ABORTS:
        err.print("Aborted.")
        return 130
    except (RosetoolError, OSError) as exc:
        if debug:
            raise
        err.print(f"[red]Error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:
        if debug:
            raise
        err.print(f"[red]Error:[/] internal error, please report it: {type(exc).__name__}: {escape(_one_line(exc))} "
                  f"(ROSETOOL_DEBUG=1 shows the traceback)", highlight=False, soft_wrap=True)
        return 1
