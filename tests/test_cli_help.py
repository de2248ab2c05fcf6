"""Every command's help reads as prose: usage `SRC DST`, no `<bool>` tags, an example to copy."""

from __future__ import annotations

from typing import Iterator

import click
import pytest
import typer

from rosetool.cli.app import app


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


ALL = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=lambda p: " ".join(p) or "rosetool")
def test_help_has_no_type_tags_on_flags_and_readable_usage(cli, path: tuple[str, ...]) -> None:
    result = cli(*path, "--help")
    assert result.code == 0, result.err
    assert "<bool>" not in result.out
    usage = next(line for line in result.out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "-h" in result.out


@pytest.mark.parametrize("path", [p for p, c in ALL if not getattr(c, "commands", None) and p[:1] != ("bench",)],
                         ids=lambda p: " ".join(p))
def test_every_leaf_command_shows_an_example(cli, path: tuple[str, ...]) -> None:
    out = cli(*path, "--help").out
    assert "Examples:" in out and f"rosetool {' '.join(path)}" in out


def test_usage_names_arguments_in_capitals(cli) -> None:
    assert "convert hf-to-native [OPTIONS] SRC DST" in cli("convert", "hf-to-native", "-h").out
    assert "generate [OPTIONS] MODEL [PROMPT]" in cli("generate", "-h").out


def test_version(cli) -> None:
    from importlib.metadata import version
    result = cli("--version")
    assert (result.code, result.out.strip()) == (0, f"rosetool {version('rosetool')}")
