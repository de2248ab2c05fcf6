"""What every backend offers the runner, and the arrival bookkeeping two of them share.

A backend turns requests plus a schedule (when each may be sent, how many may be in flight) into
one `RequestResult` per request, stamped with `time.perf_counter()`. Keeping the schedule inside
the backend lets each use its natural mechanism (engine steps, batched `generate`, threads) while
the runner and the metrics stay identical.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from rosetool.bench.metrics import RequestResult
from rosetool.bench.workload import Request, Vocab

BACKENDS = ("rosetool", "hf", "openai", "rosetool-server")
OnDone = Callable[[RequestResult], None]
OnTokens = Callable[[int], None]   # n more tokens generated (live progress); backends call it as they stream


def no_tokens(n: int) -> None:
    """The default `on_tokens`: nobody is counting."""


@dataclass
class BackendConfig:
    name: str = "rosetool"
    model: Path | None = None
    hf_model_id: str | None = None
    dtype: str | None = None
    device: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    adapters: tuple[str, ...] = ()   # LoRA folders merged at load (rosetool backends)
    expert_parallel_size: int = 1
    hf_static_cache: bool = False
    base_url: str | None = None
    served_model_name: str | None = None
    stream: bool = True
    timeout_s: float = 600.0


@dataclass
class Schedule:
    """`arrivals[i]`: seconds after the run starts when request i may be sent."""

    arrivals: list[float]
    max_concurrency: int | None = None


class Backend(Protocol):
    name: str
    model_id: str
    vocab: Vocab

    def run(self, requests: list[Request], schedule: Schedule, on_done: OnDone,
            on_tokens: OnTokens = no_tokens) -> list[RequestResult]: ...

    def close(self) -> None: ...


class Admission:
    """Releases requests once they have arrived and a client concurrency slot is free.

    Each released request comes with the moment it counts as sent: its arrival, or later the moment
    a slot freed up. Latencies start there, so time a request then spends queued in the backend
    (engine queue, waiting for the next `generate` batch) is part of its TTFT, as a client would see.
    """

    def __init__(self, schedule: Schedule):
        self.t0 = time.perf_counter()
        self.arrivals = [self.t0 + a for a in schedule.arrivals]
        self.pending = deque(range(len(schedule.arrivals)))
        slots = schedule.max_concurrency or len(schedule.arrivals)
        self.free = [self.t0] * slots  # a heap of the times each free slot became free

    @property
    def exhausted(self) -> bool:
        return not self.pending

    def due(self, most: int | None = None) -> list[tuple[int, float]]:
        """(index, sent time) of arrived requests that have a slot, at most `most` of them."""
        now, out = time.perf_counter(), []
        while self.pending and self.arrivals[self.pending[0]] <= now and self.free and len(out) < (most or math.inf):
            i = self.pending.popleft()
            out.append((i, max(self.arrivals[i], heapq.heappop(self.free))))
        return out

    def release(self, at: float) -> None:
        heapq.heappush(self.free, at)

    def wait(self) -> None:
        """Sleep until the next arrival; only called when nothing is in flight."""
        if self.pending:
            time.sleep(max(0.0, self.arrivals[self.pending[0]] - time.perf_counter()))


def fail(result: RequestResult, error: BaseException) -> None:
    result.success = False
    result.error = f"{type(error).__name__}: {error}"
    result.end = time.perf_counter()
