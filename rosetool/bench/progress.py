"""Progress on stderr, so stdout stays clean for `--json`.

On a terminal, a live bar per pass that counts generated tokens (an offline pass finishes all its
requests at the end, so counting requests alone shows 0/N for the whole pass). In a pipe or a log,
one line per finished pass with elapsed time and an ETA for the whole command.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rosetool.bench.metrics import RequestResult


class PassProgress:
    """The callbacks a backend gets for one pass: `done` per finished request, `tokens` per generated batch."""

    def __init__(self, bar: Progress | None = None, task: int = 0) -> None:
        self.bar, self.task = bar, task
        self.requests = 0
        self.generated = 0
        self._lock = threading.Lock()   # the openai backend reports from worker threads

    def done(self, result: RequestResult) -> None:
        with self._lock:
            self.requests += 1
        if self.bar is not None:
            self.bar.update(self.task, requests=self.requests)

    def tokens(self, n: int) -> None:
        with self._lock:
            self.generated += n
        if self.bar is not None:
            self.bar.advance(self.task, n)


class LiveProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.total_passes = 0
        self.finished_passes = 0
        self.started = time.perf_counter()

    def plan(self, passes: int) -> None:
        """How many passes the whole command will run, for the ETA."""
        self.total_passes, self.finished_passes, self.started = passes, 0, time.perf_counter()

    @contextmanager
    def task(self, label: str, requests: int, tokens: int) -> Iterator[PassProgress]:
        t0 = time.perf_counter()
        if self.live:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens,"),
                       TextColumn("{task.fields[requests]}/%d requests" % requests), TimeElapsedColumn())
            with Progress(*columns, console=self.console, transient=True) as bar:
                yield PassProgress(bar, bar.add_task(label, total=tokens, requests=0))
        else:
            progress = PassProgress()
            yield progress
            self.console.print(self._log_line(label, progress, time.perf_counter() - t0), highlight=False,
                               soft_wrap=True)
        self.finished_passes += 1

    def _log_line(self, label: str, p: PassProgress, seconds: float) -> str:
        elapsed = time.perf_counter() - self.started
        done = self.finished_passes + 1
        where = f"[{done}/{self.total_passes}] " if self.total_passes else ""
        eta = ""
        if self.total_passes > done:
            eta = f", ETA {elapsed / done * (self.total_passes - done):.0f} s"
        return (f"{where}{label}: {p.requests} requests, {p.generated} tokens in {seconds:.1f} s; "
                f"elapsed {elapsed:.0f} s{eta}")
