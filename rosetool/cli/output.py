"""Console plumbing shared by every command: data to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep transformers' loading bars and torch's UserWarnings out of rosetool's output: set before either
    is imported, so it costs no import. ROSETOOL_DEBUG=1 keeps them."""
    if os.environ.get("ROSETOOL_DEBUG"):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


@contextmanager
def byte_progress(description: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A bytes progress bar: yields (set_total, advance) for the converter's callbacks."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield (lambda total: progress.update(task, total=total)), (lambda n: progress.advance(task, n))
