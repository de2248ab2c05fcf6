"""Benchmark arithmetic, kept free of any backend so it can be checked on synthetic timestamps.

Definitions follow `vllm bench serve` so numbers are comparable across tools: TPOT is
(E2EL - TTFT) / (output tokens - 1), ITL is every gap between successive token arrivals (pooled
over requests), goodput is the rate of requests meeting every SLO given, and `std` is the
population standard deviation (numpy default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rosetool.errors import RosetoolError

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one request did, as absolute `time.perf_counter()` stamps.

    `token_times` holds one stamp per arrival (token, or streamed chunk); `output_tokens` is the
    count reported by the backend, which may exceed the arrivals when a chunk carries several.
    """

    prompt_len: int
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    success: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return (self.token_times[0] if self.token_times else self.end) - self.start

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def parse_percentiles(text: str) -> list[float]:
    """`"50,90,99"` -> `[50.0, 90.0, 99.0]`, rejecting anything outside [0, 100]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise RosetoolError(f"--percentiles {text!r}: expected numbers like 50,90,99") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise RosetoolError(f"--percentiles {text!r}: each value must be within 0..100")
    return values


def parse_slo(text: str | None) -> dict[str, float]:
    """`"ttft:200,tpot:50"` -> `{"ttft": 200.0, "tpot": 50.0}` (milliseconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition(":")
        name = name.strip().lower()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in SLO_METRICS or ms <= 0:
            raise RosetoolError(
                f"--slo item {item!r}: expected NAME:MS with NAME one of ttft, tpot, e2el and MS > 0"
            )
        slo[name] = ms
    return slo


def percentile_label(p: float) -> str:
    """`99.0 -> "p99"`, `99.9 -> "p99.9"`, the spelling vLLM uses in its result keys."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def describe(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """Mean, median, std and percentiles of `values_s` (seconds), keyed in milliseconds."""
    ms = np.asarray(values_s, dtype=float) * 1000.0 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in percentiles:
        out[f"{percentile_label(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def meets_slo(result: RequestResult, slo: dict[str, float]) -> bool:
    """A single-token request has no TPOT; it counts as 0 so it can only pass, as in vLLM."""
    observed = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.e2el}
    return result.success and all(observed[k] * 1000.0 <= ms for k, ms in slo.items())


def throughput(results: list[RequestResult], duration_s: float) -> dict[str, float]:
    """Completed requests and tokens per second; failed requests count only in `failed`."""
    done = [r for r in results if r.success]
    inputs = sum(r.prompt_len for r in done)
    outputs = sum(r.output_tokens for r in done)
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    return {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "request_throughput": len(done) * per_s,
        "input_throughput": inputs * per_s,
        "output_throughput": outputs * per_s,
        "total_token_throughput": (inputs + outputs) * per_s,
    }


def serving_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles: list[float],
    slo: dict[str, float] | None = None,
) -> dict[str, float]:
    """Every online metric of one run: throughput, latency distributions and goodput."""
    done = [r for r in results if r.success]
    metrics = throughput(results, duration_s)
    if slo:
        good = sum(meets_slo(r, slo) for r in done)
        metrics["request_goodput"] = good / duration_s if duration_s > 0 else math.nan
    metrics.update(describe("ttft", [r.ttft for r in done], percentiles))
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    metrics.update(describe("tpot", tpots, percentiles))
    metrics.update(describe("itl", [g for r in done for g in r.itls], percentiles))
    metrics.update(describe("e2el", [r.e2el for r in done], percentiles))
    return metrics


def batch_step_times(results: list[RequestResult]) -> list[float]:
    """When each decoding step of a fixed batch finished: the last row's k-th token stamp."""
    rows = [r.token_times for r in results if r.success and r.token_times]
    steps = min((len(t) for t in rows), default=0)
    return [max(t[k] for t in rows) for k in range(steps)]


def latency_metrics(results: list[RequestResult], start: float) -> dict[str, float]:
    """Prefill = until the whole batch has its first token; decode step = mean later gap."""
    steps = batch_step_times(results)
    if not steps:
        raise RosetoolError("latency run produced no tokens; check --output-len and the model")
    gaps = np.diff(steps)
    end = max(r.end for r in results)
    return {
        "prefill_ms": (steps[0] - start) * 1000.0,
        "decode_step_ms": float(np.mean(gaps)) * 1000.0 if len(gaps) else 0.0,
        "latency_ms": (end - start) * 1000.0,
        "decode_steps": float(len(gaps)),
    }


def aggregate(runs: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    """Median of each key across repeated runs (the headline) plus `mean_<key>` beside it."""
    out: dict[str, float] = {}
    for key in keys:
        values = [run[key] for run in runs]
        out[key] = float(np.median(values))
        out[f"mean_{key}"] = float(np.mean(values))
    return out
