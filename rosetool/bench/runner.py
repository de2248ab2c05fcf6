"""The offline, naive, online and latency loops: what is run, how often, and which numbers come out.

Every pass draws its workload with seed + pass number (counted across all modes of one command),
so no pass finds its exact prompts already in the prefix cache from an earlier warm-up or mode,
yet two backends given the same flags see the same prompts in the same pass.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from rosetool.bench import metrics, workload
from rosetool.bench.backends import Backend, Schedule
from rosetool.bench.metrics import RequestResult
from rosetool.bench.progress import LiveProgress
from rosetool.bench.workload import WorkloadSpec
from rosetool.errors import RosetoolError

MODES = ("naive", "offline", "online", "latency")
THROUGHPUT_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                   "request_throughput", "input_throughput", "output_throughput", "total_token_throughput"]
LATENCY_KEYS = ["prefill_ms", "decode_step_ms", "latency_ms", "decode_steps", "output_throughput"]


@dataclass
class RunSettings:
    warmup: int = 1
    runs: int = 3
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    slo: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8
    profile_dir: Path | None = None


@dataclass
class ModeResult:
    mode: str
    metrics: dict[str, float]
    runs: list[dict[str, float]] = field(default_factory=list)
    details: dict[str, list] = field(default_factory=dict)
    first_error: str = ""


@contextmanager
def profiling(directory: Path | None, label: str) -> Iterator[None]:
    """A torch profiler Chrome trace of one measured pass, viewable in Perfetto or chrome://tracing."""
    if directory is None:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    directory.mkdir(parents=True, exist_ok=True)
    path, k = directory / f"{label}.json", 1
    while path.exists():  # a sweep profiles one pass per value
        k += 1
        path = directory / f"{label}-{k}.json"
    with profile(activities=activities) as prof:
        yield
    prof.export_chrome_trace(str(path))


def details(results: list[RequestResult]) -> dict[str, list]:
    """Per-request arrays in seconds, named like vLLM's `--save-detailed` output."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft if r.success else None for r in results],
        "itls": [r.itls for r in results],
        "e2els": [r.e2el if r.success else None for r in results],
        "tpots": [r.tpot for r in results],
        "errors": [r.error for r in results],
    }


class Runner:
    def __init__(self, backend: Backend, spec: WorkloadSpec, settings: RunSettings, progress: LiveProgress):
        self.backend, self.spec, self.settings, self.progress = backend, spec, settings, progress
        self._first_error = ""
        self._passes = 0

    def passes(self, mode: str) -> int:
        """Passes `run(mode)` makes, warm-ups included: what progress needs for an ETA."""
        return self.settings.warmup + (1 if mode == "online" else self.settings.runs)

    def run(self, mode: str) -> ModeResult:
        self._first_error = ""
        if mode == "naive":
            return self.offline(max_concurrency=1, mode="naive")
        return {"offline": self.offline, "online": self.online, "latency": self.latency}[mode]()

    def _requests(self, num_prompts: int | None = None) -> list[workload.Request]:
        spec = replace(self.spec, seed=self.spec.seed + self._passes, num_prompts=num_prompts or self.spec.num_prompts)
        self._passes += 1
        return workload.build(spec, self.backend.vocab)

    def _pass(self, label: str, requests: list[workload.Request], schedule: Schedule,
              profile: bool = False) -> tuple[list[RequestResult], float, float]:
        """One pass over the requests: results, start stamp and wall duration."""
        trace_dir = self.settings.profile_dir if profile else None
        tokens = sum(r.output_len for r in requests)
        with self.progress.task(label, len(requests), tokens) as progress, profiling(trace_dir, label.split()[0]):
            start = time.perf_counter()
            results = self.backend.run(requests, schedule, progress.done, progress.tokens)
            duration = time.perf_counter() - start
        failed = [r for r in results if not r.success]
        if failed and len(failed) == len(results):
            raise RosetoolError(f"all {len(results)} requests failed on backend {self.backend.name}: {failed[0].error}")
        self._first_error = self._first_error or (failed[0].error if failed else "")
        return results, start, duration

    def _warmups(self, mode: str, max_concurrency: int | None, num_prompts: int | None = None) -> None:
        for k in range(self.settings.warmup):
            requests = self._requests(num_prompts)
            self._pass(f"{mode} warm-up {k + 1}", requests, Schedule([0.0] * len(requests), max_concurrency))

    def offline(self, max_concurrency: int | None = None, mode: str = "offline") -> ModeResult:
        """All requests at once (naive: one at a time); `--max-concurrency` belongs to online only."""
        self._warmups(mode, max_concurrency)
        runs, results = [], []
        for k in range(self.settings.runs):
            requests = self._requests()
            results, _, duration = self._pass(f"{mode} run {k + 1}", requests, Schedule([0.0] * len(requests), max_concurrency),
                                              profile=k == self.settings.runs - 1)
            runs.append(metrics.throughput(results, duration))
        return ModeResult(mode, metrics.aggregate(runs, THROUGHPUT_KEYS), runs, details(results), self._first_error)

    def online(self) -> ModeResult:
        s = self.settings
        self._warmups("online", s.max_concurrency)
        requests = self._requests()
        arrivals = workload.arrival_offsets(len(requests), s.request_rate, s.burstiness, self.spec.seed)
        results, _, duration = self._pass("online", requests, Schedule(arrivals, s.max_concurrency), profile=True)
        stats = metrics.serving_metrics(results, duration, s.percentiles, s.slo)
        return ModeResult("online", stats, [], details(results), self._first_error)

    def latency(self) -> ModeResult:
        """One fixed batch, all at once; prefill and decode-step times from the token stamps."""
        s = self.settings
        self._warmups("latency", None, s.batch_size)
        runs, results = [], []
        for k in range(s.runs):
            requests = self._requests(s.batch_size)
            results, start, duration = self._pass(f"latency run {k + 1}", requests,
                                                  Schedule([0.0] * len(requests)), profile=k == s.runs - 1)
            stats = metrics.latency_metrics(results, start)
            stats["output_throughput"] = sum(r.output_tokens for r in results) / duration
            runs.append(stats)
        return ModeResult("latency", metrics.aggregate(runs, LATENCY_KEYS), runs, details(results), self._first_error)
