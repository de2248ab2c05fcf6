"""Progress counts tokens on a terminal and logs one line per pass with an ETA in a pipe."""

from __future__ import annotations

import io
import re

from rich.console import Console

from rosetool.bench.progress import LiveProgress
from rosetool.bench.runner import Runner, RunSettings
from rosetool.bench.workload import WorkloadSpec
from test_bench_runner import FakeBackend


def _runner(console: Console, **settings) -> Runner:
    spec = WorkloadSpec(num_prompts=3, input_len=5, output_len=7, seed=2)
    return Runner(FakeBackend(), spec, RunSettings(**settings), LiveProgress(console))


def test_pipe_gets_one_line_per_pass_with_tokens_elapsed_and_eta() -> None:
    buf = io.StringIO()
    runner = _runner(Console(file=buf, force_terminal=False, width=200), warmup=1, runs=2)
    runner.progress.plan(runner.passes("offline") + runner.passes("online"))
    runner.run("offline")
    runner.run("online")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5   # 1 warm-up + 2 runs, then 1 warm-up + the online pass
    assert [re.match(r"\[(\d)/5\]", line).group(1) for line in lines] == ["1", "2", "3", "4", "5"]
    assert all("3 requests, 21 tokens in" in line and "elapsed" in line for line in lines)
    assert all("ETA" in line for line in lines[:-1]) and "ETA" not in lines[-1]


def test_terminal_bar_counts_tokens_of_the_pass() -> None:
    buf = io.StringIO()
    runner = _runner(Console(file=buf, force_terminal=True, width=200), warmup=0, runs=1)
    with runner.progress.task("offline run 1", requests=3, tokens=21) as progress:
        progress.tokens(5)
        progress.tokens(16)
        assert (progress.generated, progress.requests) == (21, 0)
        progress.bar.refresh()
        assert "21/21" in buf.getvalue() and "0/3 requests" in buf.getvalue()
