"""PNG plots, drawn on a bare matplotlib `Figure` so no GUI backend or global pyplot state is touched.

Axes are labelled in words with units, titles say which model, backend, device and date a chart
describes, and value labels stay inside the canvas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

AXIS_LABELS = {
    "output_throughput": "output throughput (tokens/s)",
    "request_throughput": "request throughput (requests/s)",
    "total_token_throughput": "total throughput (tokens/s)",
    "median_e2el_ms": "median end-to-end latency (ms)",
    "mean_ttft_ms": "mean time to first token (ms)",
    "mean_tpot_ms": "mean time per output token (ms)",
    "latency_ms": "batch latency (ms)",
    "prefill_ms": "prefill time (ms)",
    "decode_step_ms": "decode step time (ms)",
}


def axis_label(key: str) -> str:
    return AXIS_LABELS.get(key, key.replace("_ms", " (ms)").replace("_", " "))


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    return fig, fig.subplots()


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _curve(ax: Any, points: list[tuple[str, float, float]], name: str | None = None) -> None:
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, marker="o", label=name)
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, annotation_clip=True)


def throughput_latency(curves: dict[str, list[tuple[str, float, float]]], x_key: str, y_key: str, title: str,
                       path: Path) -> Path:
    """One marker per sweep value, labelled with it, one curve per run: the knee-of-the-curve picture."""
    fig, ax = _figure()
    for name, points in curves.items():
        _curve(ax, points, name if len(curves) > 1 else None)
    ax.set(xlabel=axis_label(x_key), ylabel=axis_label(y_key), title=title)
    xs = [x for points in curves.values() for _, x, _ in points]
    ys = [y for points in curves.values() for _, _, y in points]
    ax.set_xlim(0, max(xs, default=1.0) * 1.3 or 1.0)   # from zero, with room for the value labels
    ax.set_ylim(0, max(ys, default=1.0) * 1.2 or 1.0)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def ratio_bars(names: list[str], rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Each run's metrics as a ratio to the first run's, from zero, with 1.0 marked."""
    import numpy as np
    fig, ax = _figure()
    metrics = [r["metric"] for r in rows]
    width = 0.8 / max(1, len(names) - 1)
    for k, name in enumerate(names[1:]):
        values = [r["ratios"][k] or 0.0 for r in rows]
        ax.bar(np.arange(len(metrics)) + k * width, values, width, label=f"{name} / {names[0]}")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 2) / 2, metrics, rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel=f"ratio to {names[0]} (1.0 = same)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save(fig, path)
