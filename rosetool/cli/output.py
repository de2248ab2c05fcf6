"""Console plumbing shared by every command: data to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

out = Console()
err = Console(stderr=True)


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


@contextmanager
def byte_progress(description: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A bytes progress bar: yields (set_total, advance) for the converter's callbacks."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield (lambda total: progress.update(task, total=total)), (lambda n: progress.advance(task, n))
