"""Result files and end-of-run tables.

A saved result is one flat JSON object whose metric keys match `vllm bench serve`
(`request_throughput`, `mean_ttft_ms`, `p99_tpot_ms`, ...) next to `config` and `environment`,
so results from rosetool, vLLM or SGLang runs can be read by the same scripts. A run of several
modes nests one such object per mode under `results`.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rosetool.bench.runner import ModeResult
from rosetool.errors import RosetoolError

SUMMARY_COLUMNS = {
    "duration": "elapsed s",
    "request_throughput": "req/s",
    "input_throughput": "in tok/s",
    "output_throughput": "out tok/s",
    "total_token_throughput": "total tok/s",
    "mean_ttft_ms": "mean TTFT ms",
    "mean_tpot_ms": "mean TPOT ms",
    "mean_e2el_ms": "mean E2EL ms",
}


def environment() -> dict[str, Any]:
    import torch
    import transformers

    import rosetool

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {
        "rosetool": rosetool.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "platform": platform.platform(),
    }


def header(command: str, backend: str, model_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "backend": backend,
        "model_id": model_id,
        "config": jsonable(config),
        "environment": environment(),
    }


def describe(head: dict[str, Any]) -> str:
    """Model, backend, device and date: what every table and plot title names."""
    device = head.get("environment", {}).get("device", "?")
    return f"{head.get('model_id')} · {head.get('backend')} · {device} · {str(head.get('date', ''))[:10]}"


def mode_document(result: ModeResult, detailed: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"mode": result.mode, **result.metrics}
    if result.runs:
        doc["runs"] = result.runs
    if detailed:
        doc.update(result.details)
    return doc


def document(head: dict[str, Any], results: list[ModeResult], detailed: bool) -> dict[str, Any]:
    if len(results) == 1:
        return {**head, **mode_document(results[0], detailed)}
    return {**head, "mode": "all", "results": {r.mode: mode_document(r, detailed) for r in results}}


def save(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(doc), indent=2) + "\n")


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise RosetoolError(f"{path}: cannot read result file ({err.strerror})") from None
    except ValueError:
        raise RosetoolError(f"{path}: not a JSON file") from None
    if not isinstance(doc, dict) or not ("mode" in doc or "request_throughput" in doc):
        raise RosetoolError(f"{path}: not a benchmark result (no 'mode' or 'request_throughput' key)")
    return doc


def jsonable(value: Any) -> Any:
    """Paths become strings, inf/nan become strings (JSON has neither), dataclasses become dicts."""
    if hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def fmt(value: Any) -> str:
    """Counts (medians of counts included) without decimals, everything else with two."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1e6 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def mode_table(result: ModeResult, about: str) -> Table:
    """Repeated runs show median and mean side by side; a single run shows its value."""
    title = f"{result.mode} ({len(result.runs)} runs)" if result.runs else result.mode
    table = Table(title=f"{title}: {about}")
    table.add_column("metric")
    if result.runs:
        table.add_column("median", justify="right")
        table.add_column("mean", justify="right")
        for key in result.runs[0]:
            table.add_row(key, fmt(result.metrics[key]), fmt(result.metrics[f"mean_{key}"]))
    else:
        table.add_column("value", justify="right")
        for key, value in result.metrics.items():
            table.add_row(key, fmt(value))
    return table


def summary_table(results: list[ModeResult], title: str) -> Table:
    """One row per mode, the comparison the original naive/offline/online script printed."""
    table = Table(title=title)
    table.add_column("mode")
    for label in SUMMARY_COLUMNS.values():
        table.add_column(label, justify="right")
    for r in results:
        table.add_row(r.mode, *(fmt(r.metrics.get(key)) for key in SUMMARY_COLUMNS))
    return table


def print_results(console: Console, results: list[ModeResult], title: str) -> None:
    for result in results:
        console.print(mode_table(result, title))
        if result.first_error:
            console.print(f"[yellow]{result.metrics.get('failed', 'some')} request(s) failed; first: {result.first_error}")
    if len(results) > 1:
        console.print(summary_table(results, title))
