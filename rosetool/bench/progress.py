"""Live progress on stderr, so stdout stays clean for `--json`; only on a terminal, so logs stay clean."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rosetool.bench.metrics import RequestResult


class LiveProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[RequestResult], None]]:
        """Yields the callback a backend calls per finished request (thread-safe in rich)."""
        if not self.enabled:
            yield lambda result: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda result: bar.advance(task)
