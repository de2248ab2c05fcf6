"""The runner's loops against a fake backend: passes, schedules, seeding and failure handling."""

from __future__ import annotations

import time

import pytest

from rosetool.bench.backends import Schedule
from rosetool.bench.metrics import RequestResult
from rosetool.bench.progress import LiveProgress
from rosetool.bench.runner import Runner, RunSettings
from rosetool.bench.workload import Request, Vocab, WorkloadSpec, arrival_offsets
from rosetool.errors import RosetoolError


class FakeBackend:
    """Answers every request with `output_len` tokens 1 ms apart; prompts equal to [7] fail."""

    name, model_id = "fake", "fake-model"

    def __init__(self) -> None:
        self.vocab = Vocab(size=64)
        self.calls: list[tuple[list[Request], Schedule]] = []

    def run(self, requests, schedule, on_done, on_tokens=lambda n: None):
        self.calls.append((requests, schedule))
        now = time.perf_counter()
        results = []
        for r in requests:
            ok = r.prompt != [7]
            stamps = [now + 0.001 * (k + 1) for k in range(r.output_len)] if ok else []
            result = RequestResult(r.prompt_len, start=now, end=stamps[-1] if ok else now, token_times=stamps,
                                   output_tokens=len(stamps), success=ok, error="" if ok else "refused")
            on_tokens(len(stamps))
            on_done(result)
            results.append(result)
        return results

    def close(self) -> None:
        pass


def make_runner(**settings) -> tuple[Runner, FakeBackend]:
    backend = FakeBackend()
    spec = WorkloadSpec(num_prompts=4, input_len=5, output_len=3, seed=11)
    return Runner(backend, spec, RunSettings(**settings), LiveProgress()), backend


def prompts(call) -> list[tuple[int, ...]]:
    return [tuple(r.prompt) for r in call[0]]


def test_offline_runs_warmups_then_measured_runs_all_at_once():
    runner, backend = make_runner(warmup=2, runs=3)
    result = runner.run("offline")
    assert len(backend.calls) == 5 and len(result.runs) == 3
    assert all(s.arrivals == [0.0] * 4 and s.max_concurrency is None for _, s in backend.calls)
    assert result.metrics["total_output_tokens"] == 12 and "mean_request_throughput" in result.metrics
    assert result.details["output_lens"] == [3, 3, 3, 3]


def test_naive_sends_one_request_at_a_time():
    runner, backend = make_runner(warmup=0, runs=1)
    assert runner.run("naive").mode == "naive"
    assert backend.calls[0][1].max_concurrency == 1


def test_no_pass_repeats_an_earlier_pass_prompts_across_modes():
    runner, backend = make_runner(warmup=1, runs=2)
    for mode in ("naive", "offline", "online"):
        runner.run(mode)
    seen = [prompts(call) for call in backend.calls]
    assert len(seen) == 8 and len({tuple(p) for p in seen}) == 8
    again, backend2 = make_runner(warmup=1, runs=2)
    again.run("naive")
    assert prompts(backend2.calls[0]) == seen[0]  # same flags, same prompts


def test_online_uses_seeded_arrivals_and_concurrency():
    runner, backend = make_runner(warmup=0, request_rate=5.0, burstiness=2.0, max_concurrency=3, slo={"ttft": 1e6})
    result = runner.run("online")
    schedule = backend.calls[0][1]
    assert schedule.arrivals == arrival_offsets(4, 5.0, 2.0, 11) and schedule.max_concurrency == 3
    assert result.metrics["request_goodput"] == pytest.approx(result.metrics["request_throughput"])
    assert result.metrics["mean_itl_ms"] == pytest.approx(1.0, rel=1e-3)


def test_latency_uses_batch_size_and_reports_steps():
    runner, backend = make_runner(warmup=1, runs=2, batch_size=6)
    result = runner.run("latency")
    assert [len(call[0]) for call in backend.calls] == [6, 6, 6]
    assert result.metrics["decode_steps"] == 2
    assert result.metrics["decode_step_ms"] == pytest.approx(1.0, rel=1e-3)


def test_partial_failures_are_reported_and_total_failure_raises(tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text('{"prompt": [7]}\n{"prompt": [8, 9]}\n')
    runner, _ = make_runner(warmup=0, runs=1)
    runner.spec = WorkloadSpec(kind="jsonl", path=data, output_len=2)
    result = runner.run("offline")
    assert result.metrics["failed"] == 1 and result.first_error == "refused"
    data.write_text('{"prompt": [7]}\n')
    with pytest.raises(RosetoolError, match="all 1 requests failed on backend fake: refused"):
        runner.run("offline")
