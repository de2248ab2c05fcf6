"""One benchmark repeated over a list of values, so a single command draws the throughput/latency curve."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table

from rosetool.bench.report import fmt, mode_document
from rosetool.bench.runner import ModeResult, Runner
from rosetool.errors import RosetoolError


@dataclass(frozen=True)
class Axis:
    """A sweepable flag: the mode it drives, the setting it sets and what the plot puts on y."""

    flag: str
    mode: str
    setting: str
    cast: type
    latency_key: str


AXES = {
    "concurrency": Axis("--concurrency", "online", "max_concurrency", int, "median_e2el_ms"),
    "request_rate": Axis("--request-rate", "online", "request_rate", float, "median_e2el_ms"),
    "batch_size": Axis("--batch-size", "latency", "batch_size", int, "latency_ms"),
}
TABLE_COLUMNS = {"request_throughput": "req/s", "output_throughput": "out tok/s", "mean_ttft_ms": "mean TTFT ms",
                 "mean_tpot_ms": "mean TPOT ms", "median_e2el_ms": "median E2EL ms", "prefill_ms": "prefill ms",
                 "decode_step_ms": "decode step ms", "latency_ms": "latency ms"}


def parse_values(axis: Axis, text: str) -> list[Any]:
    try:
        values = [axis.cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RosetoolError(f"{axis.flag} {text!r}: expected a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise RosetoolError(f"{axis.flag} {text!r}: every value must be greater than 0")
    return values


DEFAULT_SWEEP = ("concurrency", "1,4,16")


def pick_axis(lists: dict[str, str | None]) -> tuple[str, Axis, str]:
    """The one list given; none given: the default concurrency sweep."""
    given = [(name, text) for name, text in lists.items() if text]
    if not given:
        given = [DEFAULT_SWEEP]
    if len(given) != 1:
        raise RosetoolError("sweep takes one of --concurrency, --request-rate, --batch-size (default: "
                            f"--{DEFAULT_SWEEP[0]} {DEFAULT_SWEEP[1]})")
    name, text = given[0]
    return name, AXES[name], text


def run_sweep(runner: Runner, axis: Axis, values: list[Any]) -> list[ModeResult]:
    base = runner.settings
    results = []
    for value in values:
        runner.settings = replace(base, **{axis.setting: value})
        results.append(runner.run(axis.mode))
    runner.settings = base
    return results


def sweep_document(head: dict, name: str, axis: Axis, values: list[Any], results: list[ModeResult],
                   detailed: bool) -> dict:
    points = [{name: v, **mode_document(r, detailed)} for v, r in zip(values, results)]
    return {**head, "mode": "sweep", "sweep": {"parameter": name, "command": axis.mode, "values": values},
            "points": points}


def plot_points(name: str, axis: Axis, values: list[Any], results: list[ModeResult]) -> list[tuple[str, float, float]]:
    return [(f"{name}={v}", r.metrics["output_throughput"], r.metrics[axis.latency_key]) for v, r in zip(values, results)]


def saved_curve(doc: dict[str, Any]) -> tuple[list[tuple[str, float, float]], str]:
    """A saved sweep's points (label, output tokens/s, latency) and the latency metric they use."""
    name = doc["sweep"]["parameter"]
    key = AXES[name].latency_key
    return [(f"{name}={p[name]}", p["output_throughput"], p[key]) for p in doc["points"]], key


def sweep_table(name: str, values: list[Any], results: list[ModeResult], about: str) -> Table:
    keys = [k for k in TABLE_COLUMNS if k in results[0].metrics]
    table = Table(title=f"sweep over {name}: {about}")
    table.add_column(name, justify="right")
    for key in keys:
        table.add_column(TABLE_COLUMNS[key], justify="right")
    for value, result in zip(values, results):
        table.add_row(str(value), *(fmt(result.metrics[k]) for k in keys))
    return table
