"""`rosetool bench`: the same workload and metrics on any backend, saved, plotted and compared.

Runner, backends and metrics pull in torch and numpy, so they are imported inside the commands.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from rosetool.bench.cli_options import (ARRIVALS, MODEL, OUTPUT, REPEAT, SERVING, SWEEP, WORKLOAD, Options,
                                        bench_command, err_console, flags_given,
                                        one_line_errors)
from rosetool.errors import RosetoolError

from .help import CONTEXT, Group, examples

if TYPE_CHECKING:
    from rosetool.bench.runner import ModeResult, Runner

app = typer.Typer(
    help="Benchmark a model: offline throughput, online serving latency, fixed-batch latency, sweeps. "
         "With no subcommand, runs --mode (default all: naive, offline and online in one table). On CPU the "
         "default workload is scaled down to about a minute (flags you give are kept).",
    cls=Group, context_settings=CONTEXT,
    epilog="Examples:  rosetool bench  ·  rosetool bench offline --model ./native --num-prompts 64  ·  "
           "rosetool bench sweep --concurrency 1,8,64  ·  rosetool bench compare a.json b.json --plot ab.png",
)
ALL_MODES = {"all": ["naive", "offline", "online"], "naive": ["naive"], "offline": ["offline"], "online": ["online"]}


def _defaulted(ctx: typer.Context) -> set[str]:
    return {name for name in ctx.params if (src := ctx.get_parameter_source(name)) is not None and src.name == "DEFAULT"}


@contextmanager
def prepared(ctx: typer.Context, o: Options, modes: list[str], points: int = 1) -> Iterator[tuple[Runner, dict[str, Any]]]:
    """Settings fitted to the device, a loaded backend and a runner over it; the document header comes along."""
    from rosetool.bench import report, settings
    from rosetool.bench.backends import Backend, make_backend
    from rosetool.bench.device_fit import fit_to_device
    from rosetool.bench.progress import LiveProgress
    from rosetool.bench.runner import Runner

    o, note = fit_to_device(o, _defaulted(ctx))
    cfg, spec, run_settings = settings.build(o)
    backend: Backend = make_backend(cfg)   # bad flags and models fail before the note
    if note:
        err_console.print(note, highlight=False, soft_wrap=True)
    try:
        progress = LiveProgress()
        runner = Runner(backend, spec, run_settings, progress)
        progress.plan(points * sum(runner.passes(m) for m in modes))
        head = report.header(ctx.command_path, backend.name, backend.model_id,
                             settings.saved_config(cfg, spec, run_settings))
        yield runner, head
    finally:
        backend.close()


def finish(o: Options, doc: dict[str, Any], show: Callable[[Console], None]) -> None:
    """Save if asked, then print either the JSON document or the tables."""
    from rosetool.bench import report
    if o.save_result:
        report.save(doc, o.save_result)
        err_console.print(f"saved {o.save_result}")
    if o.json_out:
        typer.echo(json.dumps(report.jsonable(doc), indent=2))
    else:
        show(Console())


def run_modes(ctx: typer.Context, o: Options, modes: list[str]) -> None:
    from rosetool.bench import report
    with prepared(ctx, o, modes) as (runner, head):
        results: list[ModeResult] = [runner.run(m) for m in modes]
    doc = report.document(head, results, o.save_detailed)
    finish(o, doc, lambda console: report.print_results(console, results, report.describe(head)))


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


@app.command(**examples("rosetool bench offline", "rosetool bench offline --backend hf --num-prompts 64 --runs 5"))
@bench_command(MODEL, WORKLOAD, REPEAT, OUTPUT)
def offline(ctx: typer.Context, o: Options) -> None:
    """All requests at once: requests/s, input/output/total tokens/s and elapsed, median and mean of --runs."""
    run_modes(ctx, o, ["offline"])


@app.command(**examples("rosetool bench online --request-rate 4", "rosetool bench online --slo ttft:200,tpot:50"))
@bench_command(MODEL, WORKLOAD, ["warmup"], ARRIVALS, OUTPUT)
def online(ctx: typer.Context, o: Options) -> None:
    """Requests arrive over time: TTFT, TPOT, ITL, E2E latency with percentiles, and goodput against --slo."""
    run_modes(ctx, o, ["online"])


@app.command(**examples("rosetool bench latency --batch-size 8", "rosetool bench latency --backend hf"))
@bench_command(MODEL, WORKLOAD, REPEAT, ["batch_size"], OUTPUT)
def latency(ctx: typer.Context, o: Options) -> None:
    """One fixed batch of --batch-size requests: prefill time and per-step decode time."""
    run_modes(ctx, o, ["latency"])


@app.command(**examples("rosetool bench sweep", "rosetool bench sweep --request-rate 1,4,16 --plot rate.png",
                         "rosetool bench sweep --batch-size 1,8,32"))
@bench_command(MODEL, WORKLOAD, REPEAT, SERVING, SWEEP, OUTPUT)
def sweep(ctx: typer.Context, o: Options) -> None:
    """Run online (--concurrency, --request-rate) or latency (--batch-size) over a list (default:
    --concurrency 1,4,16); table and PNG plot."""
    from rosetool.bench import report, sweep as sweep_mod
    from rosetool.bench.plot import throughput_latency

    name, axis, text = sweep_mod.pick_axis(
        {"concurrency": o.concurrency_list, "request_rate": o.request_rate_list, "batch_size": o.batch_size_list})
    values = sweep_mod.parse_values(axis, text)
    with prepared(ctx, o, [axis.mode], len(values)) as (runner, head):
        results = sweep_mod.run_sweep(runner, axis, values)
    about = report.describe(head)
    points = sweep_mod.plot_points(name, axis, values, results)
    throughput_latency({head["backend"]: points}, "output_throughput", axis.latency_key,
                       f"sweep over {name}\n{about}", o.plot)
    err_console.print(f"plot {o.plot}")
    doc = {**sweep_mod.sweep_document(head, name, axis, values, results, o.save_detailed), "plot": str(o.plot)}
    finish(o, doc, lambda console: console.print(sweep_mod.sweep_table(name, values, results, about)))


@app.command(**examples("rosetool bench compare before.json after.json",
                         "rosetool bench compare a.json b.json c.json --plot compare.png"))
@one_line_errors
def compare(
    files: Annotated[list[Path], typer.Argument(help="Saved results (--save-result); the first is the baseline.")],
    all_metrics: Annotated[bool, typer.Option("--all", help="Every numeric key, not only headline metrics.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the runs on one chart (PNG): sweeps as "
                                                 "curves, other results as ratios to the first file.")] = None,
) -> None:
    """Side-by-side table of saved results, with each file's ratio to the first and which direction is better."""
    from rosetool.bench import compare as compare_mod, report

    if len(files) < 2:
        raise RosetoolError("compare needs at least two result files")
    names = compare_mod.labels(files)
    docs = [report.load(f) for f in files]
    for warning in compare_mod.incomparable(names, docs):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    data = compare_mod.rows(docs, all_metrics)
    if plot is not None:
        _compare_plot(names, docs, data, plot)
        err_console.print(f"plot {plot}")
    if json_out:
        typer.echo(json.dumps({"files": [str(f) for f in files], "rows": data}, indent=2))
    else:
        Console().print(compare_mod.table(names, data))


def _compare_plot(names: list[str], docs: list[dict[str, Any]], data: list[dict[str, Any]], path: Path) -> None:
    from rosetool.bench import report, sweep as sweep_mod
    from rosetool.bench.plot import ratio_bars, throughput_latency

    about = " vs ".join(dict.fromkeys(report.describe(d) for d in docs))
    if all(d.get("mode") == "sweep" for d in docs):
        curves = {name: sweep_mod.saved_curve(d) for name, d in zip(names, docs)}
        keys = {key for _, key in curves.values()}
        if len(keys) > 1:
            raise RosetoolError(f"--plot: the sweeps measure different latencies ({', '.join(sorted(keys))})")
        throughput_latency({n: c for n, (c, _) in curves.items()}, "output_throughput", keys.pop(),
                           f"compare sweeps\n{about}", path)
    else:
        ratio_bars(names, data, f"compare: ratio to {names[0]}\n{about}", path)
