"""Side-by-side saved results, each column also shown as a ratio to the first file.

Files are flattened to `prefix.metric` keys (`online.mean_ttft_ms`, `concurrency=8.request_throughput`)
so single-mode, multi-mode and sweep results line up; a `vllm bench serve` JSON has the same keys
and compares too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from rosetool.bench.report import fmt
from rosetool.errors import RosetoolError

HEADLINE = {
    "duration", "completed", "failed", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    "prefill_ms", "decode_step_ms", "latency_ms",
}


LOWER_IS_BETTER = ("_ms", "duration", "failed")


def better(metric: str) -> str:
    """Which direction is an improvement: latencies, durations and failures down, throughputs up."""
    name = metric.rsplit(".", 1)[-1]
    return "lower" if name.endswith(LOWER_IS_BETTER) else "higher"


def kind(doc: dict[str, Any]) -> str:
    """What a result measured: its mode (a sweep: over which parameter), and the workload size."""
    mode = doc.get("mode", "?")
    if mode == "sweep":
        mode = f"sweep over {doc.get('sweep', {}).get('parameter')}"
    w = doc.get("config", {}).get("workload", {})
    size = f"{w.get('num_prompts')} prompts x {w.get('input_len')} in / {w.get('output_len')} out" if w else ""
    return f"{mode}, {size}" if size else mode


def incomparable(names: list[str], docs: list[dict[str, Any]]) -> list[str]:
    """One warning per file whose mode or workload differs from the first file's."""
    base = kind(docs[0])
    return [f"{name} measured {kind(doc)}; {names[0]} measured {base}: their numbers are not comparable"
            for name, doc in zip(names[1:], docs[1:]) if kind(doc) != base]


def _numbers(doc: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(doc: dict[str, Any]) -> dict[str, float]:
    if isinstance(doc.get("results"), dict):
        out: dict[str, float] = {}
        for mode, sub in doc["results"].items():
            out.update(_numbers(sub, f"{mode}."))
        return out
    if isinstance(doc.get("points"), list):
        name = doc.get("sweep", {}).get("parameter", "point")
        out = {}
        for point in doc["points"]:
            out.update(_numbers(point, f"{name}={point.get(name)}."))
        return out
    return _numbers(doc, "")


def rows(docs: list[dict[str, Any]], show_all: bool) -> list[dict[str, Any]]:
    """Every metric present in any file, in first-seen order; values missing from a file are None."""
    flats = [flatten(d) for d in docs]
    keys: dict[str, None] = {}
    for flat in flats:
        keys.update(dict.fromkeys(k for k in flat if show_all or k.rsplit(".", 1)[-1] in HEADLINE))
    if not keys:
        raise RosetoolError("the result files share no metrics to compare; try --all")
    out = []
    for key in keys:
        values = [flat.get(key) for flat in flats]
        base = values[0]
        ratios = [v / base if v is not None and base else None for v in values[1:]]
        out.append({"metric": key, "better": better(key), "values": values, "ratios": ratios})
    return out


def table(names: list[str], data: list[dict[str, Any]]) -> Table:
    out = Table(title="compare (ratio = file / first file; green: better, red: worse)")
    out.add_column("metric")
    out.add_column("better")
    for name in names:
        out.add_column(name, justify="right")
    for name in names[1:]:
        out.add_column(f"{name} / {names[0]}", justify="right")
    for row in data:
        ratios = [_ratio(r, row["better"]) for r in row["ratios"]]
        out.add_row(row["metric"], row["better"], *(fmt(v) for v in row["values"]), *ratios)
    return out


def _ratio(r: float | None, direction: str) -> str:
    if r is None:
        return "-"
    if r == 1.0:
        return f"{r:.3f}x"
    good = (r > 1.0) == (direction == "higher")
    return f"[{'green' if good else 'red'}]{r:.3f}x[/]"


def labels(paths: list[Path]) -> list[str]:
    """File stems, or full paths when two files share a stem."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
