"""Server metrics in the Prometheus text format, kept by hand: a few counters and histograms do
not justify a client library, and the names follow vLLM's so the same dashboards read both.

Latencies are observed by the HTTP handlers (what a client sees); queue and KV-cache gauges are
read from the engine at scrape time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from rosetool.runtime import LLM

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)   # the last slot is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total}", f"{name}_count {running}"]


@dataclass
class ServerMetrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Counter = field(default_factory=Counter)   # finish_reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def render(self, llm: LLM) -> str:
        scheduler, blocks = llm.scheduler, llm.scheduler.block_manager
        hit_tokens = blocks.num_hit_blocks * blocks.block_size
        out = [
            *_one("rosetool_num_requests_running", "gauge", "Requests in the running batch.", len(scheduler.running)),
            *_one("rosetool_num_requests_waiting", "gauge", "Requests queued for a first schedule.",
                  len(scheduler.waiting)),
            *_one("rosetool_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", blocks.num_blocks),
            *_one("rosetool_kv_cache_blocks_used", "gauge", "KV-cache blocks held by requests.",
                  blocks.num_blocks - blocks.num_free_blocks),
            *_one("rosetool_kv_cache_blocks_free", "gauge", "KV-cache blocks free (cached prefixes included).",
                  blocks.num_free_blocks),
            *_one("rosetool_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                  hit_tokens),
            *_one("rosetool_prefix_cache_hit_rate", "gauge",
                  "Prefix-cache hit tokens / prompt tokens (recomputes after preemption count as hits too).",
                  min(1.0, hit_tokens / self.prompt_tokens) if self.prompt_tokens else 0.0),
            *_one("rosetool_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", self.prompt_tokens),
            *_one("rosetool_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            *_one("rosetool_num_preemptions_total", "counter", "Requests preempted for KV space.",
                  scheduler.num_preemptions),
            "# HELP rosetool_requests_finished_total Finished requests (choices) by finish reason.",
            "# TYPE rosetool_requests_finished_total counter",
            *(f'rosetool_requests_finished_total{{finished_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())),
        ]
        for name, kind, hist in (("rosetool_time_to_first_token_seconds", "Time to first token.", self.ttft),
                                 ("rosetool_time_per_output_token_seconds", "Time between output tokens.", self.tpot),
                                 ("rosetool_e2e_request_latency_seconds", "Request latency.", self.e2e)):
            out += [f"# HELP {name} {kind}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"


def _one(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
