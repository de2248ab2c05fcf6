"""The openai backend against an in-test stub server, plus backend pieces checked in isolation."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from rosetool.bench.backends.base import Admission, Schedule
from rosetool.bench.backends.hf import HFBackend, StepClock
from rosetool.bench.backends.openai import completions_path
from rosetool.bench.workload import arrival_offsets
from rosetool.cli.bench import app
from test_bench_support import stub_server, tiny_model  # noqa: F401  (fixtures)

SMALL = ["--num-prompts", "4", "--input-len", "5", "--output-len", "3", "--warmup", "0"]


def openai_run(server, model, *args: str):
    url = f"http://127.0.0.1:{server.server_port}"
    return CliRunner().invoke(app, ["online", "--backend", "openai", "--base-url", url, "--model", str(model),
                                    *SMALL, *args, "--json", "--save-detailed"])


def test_streaming_counts_tokens_and_times_each_chunk(stub_server, tiny_model):
    result = openai_run(stub_server, tiny_model, "--request-rate", "inf")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model_id"] == "stub-model" and doc["completed"] == 4 and doc["failed"] == 0
    assert doc["total_output_tokens"] == 12 and doc["output_lens"] == [3, 3, 3, 3]
    assert [len(itl) for itl in doc["itls"]] == [2, 2, 2, 2]
    assert all(0 < t <= e for t, e in zip(doc["ttfts"], doc["e2els"]))
    body = stub_server.bodies[0]
    assert body["model"] == "stub-model" and body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 5  # token ids, not text
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_non_streaming_uses_usage_and_ttft_equals_e2el(stub_server, tiny_model):
    result = openai_run(stub_server, tiny_model, "--no-stream")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["total_output_tokens"] == 12
    assert doc["ttfts"] == doc["e2els"] and doc["itls"] == [[], [], [], []]
    assert "stream_options" not in stub_server.bodies[0] and stub_server.bodies[0]["stream"] is False


def test_arrival_schedule_and_concurrency_are_respected(stub_server, tiny_model):
    result = openai_run(stub_server, tiny_model, "--request-rate", "20", "--max-concurrency", "2", "--seed", "5")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert stub_server.max_active <= 2
    assert doc["duration"] >= arrival_offsets(4, 20.0, 1.0, 5)[-1]


def test_failed_requests_are_counted(stub_server, tiny_model, tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text('{"prompt": [13]}\n{"prompt": [5, 6]}\n{"prompt": [13]}\n')
    result = openai_run(stub_server, tiny_model, "--workload", "jsonl", "--dataset-path", str(data))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["completed"] == 1 and doc["failed"] == 2
    assert doc["errors"][0].startswith("ServerError: HTTP 500") and doc["errors"][1] == ""
    assert doc["total_input_tokens"] == 2


def test_all_requests_failing_is_an_error(stub_server, tiny_model, tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text('{"prompt": [13]}\n')
    result = openai_run(stub_server, tiny_model, "--workload", "jsonl", "--dataset-path", str(data))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith("Error: all 1 requests failed on backend openai: ServerError: HTTP 500")


def test_unreachable_server_is_a_one_line_error(tiny_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(app, ["offline", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: cannot reach OpenAI-compatible server at http://127.0.0.1:{port}")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "openai"], "needs --base-url"),
    (["--backend", "openai", "--base-url", "ftp://host"], "expected http(s)://"),
    (["--base-url", "http://127.0.0.1:1"], "only used by --backend openai"),
])
def test_openai_flag_errors(args, message):
    result = CliRunner().invoke(app, ["offline", *args])
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize(("base", "path"), [("", "/v1/completions"), ("/v1", "/v1/completions"),
                                            ("/v1/", "/v1/completions"), ("/x/v1/completions", "/x/v1/completions")])
def test_completions_path(base, path):
    assert completions_path(base) == path


def test_admission_waits_for_arrival_and_free_slot():
    admission = Admission(Schedule([0.0, 0.0, 0.0, 0.05], max_concurrency=2))
    t0 = admission.t0
    assert admission.due() == [(0, t0), (1, t0)]
    assert admission.due() == []  # both slots busy
    admission.release(t0 + 0.01)
    assert admission.due() == [(2, t0 + 0.01)]  # sent when the slot freed, not when picked up
    admission.release(t0 + 0.02)
    admission.release(t0 + 0.03)
    assert admission.due() == []  # request 3 has not arrived yet
    admission.wait()
    assert time.perf_counter() - t0 >= 0.05
    assert admission.due() == [(3, t0 + 0.05)] and admission.exhausted


def test_admission_batch_cap_does_not_delay_sent_time():
    admission = Admission(Schedule([0.0, 0.0, 0.0]))
    assert [i for i, _ in admission.due(most=2)] == [0, 1]
    time.sleep(0.01)
    assert admission.due(most=2) == [(2, admission.t0)]


def test_step_clock_stamps_each_step_and_stops_rows_at_their_length():
    counted: list[int] = []
    clock = StepClock(prompt_width=4, row_limits=[1, 3], device=torch.device("cpu"), on_tokens=counted.append)
    first = clock(torch.zeros(2, 5, dtype=torch.long), None)
    third = clock(torch.zeros(2, 7, dtype=torch.long), None)
    assert first.tolist() == [True, False] and third.tolist() == [True, True]
    assert counted == [2, 1]   # both rows' first tokens, then only the row still generating
    assert len(clock.times) == 2 and clock.times[0] <= clock.times[1]


@pytest.mark.parametrize(("ignore_eos", "row", "limit", "count"), [
    (False, [5, 7, 1, 1, 1], 5, 3),   # through the first EOS (id 1)
    (False, [5, 7, 8], 2, 2),         # capped by the request's output length
    (True, [1, 1, 1, 1], 3, 3),       # EOS is an ordinary token when ignored
])
def test_hf_counts_generated_tokens_not_padding(ignore_eos, row, limit, count):
    backend = HFBackend.__new__(HFBackend)
    backend.cfg, backend.eos = SimpleNamespace(ignore_eos=ignore_eos), 1
    assert backend._count(row, limit) == count
