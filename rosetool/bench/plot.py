"""PNG plots, drawn on a bare matplotlib `Figure` so no GUI backend or global pyplot state is touched."""

from __future__ import annotations

from pathlib import Path


def throughput_latency(points: list[tuple[str, float, float]], x_label: str, y_label: str, title: str,
                       path: Path) -> Path:
    """One marker per sweep value, labelled with it: the usual knee-of-the-curve picture."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, marker="o")
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.1)  # room for the value labels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
