"""`rosetool bench`: the same workload and metrics on any backend, saved, plotted and compared."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

import typer
from rich.console import Console

from rosetool.bench import compare as compare_mod
from rosetool.bench import report, settings, sweep as sweep_mod
from rosetool.bench.backends import Backend, make_backend
from rosetool.bench.cli_options import (ARRIVALS, MODEL, OUTPUT, REPEAT, SERVING, SWEEP, WORKLOAD, Options,
                                        bench_command, err_console, flags_given,
                                        one_line_errors)
from rosetool.bench.plot import throughput_latency
from rosetool.bench.progress import LiveProgress
from rosetool.bench.runner import ModeResult, Runner
from rosetool.errors import RosetoolError

app = typer.Typer(
    help="Benchmark a model: offline throughput, online serving latency, fixed-batch latency, sweeps. "
         "With no subcommand, runs --mode (default all: naive, offline and online in one table).",
)
ALL_MODES = {"all": ["naive", "offline", "online"], "naive": ["naive"], "offline": ["offline"], "online": ["online"]}


@contextmanager
def prepared(ctx: typer.Context, o: Options) -> Iterator[tuple[Runner, dict[str, Any]]]:
    """Validated settings, a loaded backend and a runner over it; the document header comes along."""
    cfg, spec, run_settings = settings.build(o)
    backend: Backend = make_backend(cfg)
    try:
        runner = Runner(backend, spec, run_settings, LiveProgress())
        head = report.header(ctx.command_path, backend.name, backend.model_id,
                             settings.saved_config(cfg, spec, run_settings))
        yield runner, head
    finally:
        backend.close()


def finish(o: Options, doc: dict[str, Any], show: Callable[[Console], None]) -> None:
    """Save if asked, then print either the JSON document or the tables."""
    if o.save_result:
        report.save(doc, o.save_result)
        err_console.print(f"saved {o.save_result}")
    if o.json_out:
        typer.echo(json.dumps(report.jsonable(doc), indent=2))
    else:
        show(Console())


def run_modes(ctx: typer.Context, o: Options, modes: list[str]) -> None:
    with prepared(ctx, o) as (runner, head):
        results: list[ModeResult] = [runner.run(m) for m in modes]
    doc = report.document(head, results, o.save_detailed)
    finish(o, doc, lambda console: report.print_results(console, results, f"{head['backend']} on {head['model_id']}"))


@app.callback(invoke_without_command=True)
@bench_command(MODEL, WORKLOAD, REPEAT, ARRIVALS, OUTPUT, ["mode"])
def bench(ctx: typer.Context, o: Options) -> None:
    """Benchmark a model. Options go after the subcommand; with none, `--mode all` reproduces the
    naive / offline / online comparison of the script rosetool grew out of."""
    if ctx.invoked_subcommand:
        given = flags_given(o)
        if given:
            raise RosetoolError(f"put {given[0]} after the subcommand: rosetool bench {ctx.invoked_subcommand} {given[0]} ...")
        return
    if o.mode not in ALL_MODES:
        raise RosetoolError(f"--mode {o.mode!r}: choose one of {', '.join(ALL_MODES)}")
    run_modes(ctx, o, ALL_MODES[o.mode])


@app.command()
@bench_command(MODEL, WORKLOAD, REPEAT, OUTPUT)
def offline(ctx: typer.Context, o: Options) -> None:
    """All requests at once: requests/s, input/output/total tokens/s and elapsed, median and mean of --runs."""
    run_modes(ctx, o, ["offline"])


@app.command()
@bench_command(MODEL, WORKLOAD, ["warmup"], ARRIVALS, OUTPUT)
def online(ctx: typer.Context, o: Options) -> None:
    """Requests arrive over time: TTFT, TPOT, ITL, E2E latency with percentiles, and goodput against --slo."""
    run_modes(ctx, o, ["online"])


@app.command()
@bench_command(MODEL, WORKLOAD, REPEAT, ["batch_size"], OUTPUT)
def latency(ctx: typer.Context, o: Options) -> None:
    """One fixed batch of --batch-size requests: prefill time and per-step decode time."""
    run_modes(ctx, o, ["latency"])


@app.command()
@bench_command(MODEL, WORKLOAD, REPEAT, SERVING, SWEEP, OUTPUT)
def sweep(ctx: typer.Context, o: Options) -> None:
    """Run online (--concurrency, --request-rate) or latency (--batch-size) over a list; table and PNG plot."""
    name, axis, text = sweep_mod.pick_axis(
        {"concurrency": o.concurrency_list, "request_rate": o.request_rate_list, "batch_size": o.batch_size_list})
    values = sweep_mod.parse_values(axis, text)
    with prepared(ctx, o) as (runner, head):
        results = sweep_mod.run_sweep(runner, axis, values)
    points = sweep_mod.plot_points(name, axis, values, results)
    throughput_latency(points, "output tokens/s", axis.latency_key, f"{head['backend']} on {head['model_id']}", o.plot)
    err_console.print(f"plot {o.plot}")
    doc = {**sweep_mod.sweep_document(head, name, axis, values, results, o.save_detailed), "plot": str(o.plot)}
    finish(o, doc, lambda console: console.print(sweep_mod.sweep_table(name, values, results)))


@app.command()
@one_line_errors
def compare(
    files: Annotated[list[Path], typer.Argument(help="Saved results (--save-result); the first is the baseline.")],
    all_metrics: Annotated[bool, typer.Option("--all", help="Every numeric key, not only headline metrics.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Side-by-side table of saved results, with each file's ratio to the first."""
    if len(files) < 2:
        raise RosetoolError("compare needs at least two result files")
    names = compare_mod.labels(files)
    data = compare_mod.rows([report.load(f) for f in files], all_metrics)
    if json_out:
        typer.echo(json.dumps({"files": [str(f) for f in files], "rows": data}, indent=2))
    else:
        Console().print(compare_mod.table(names, data))
