"""`rosetool serve` cannot be starved by one client: bodies, prompts, slow headers, connection floods and
out-of-range numbers each fail that client alone, in OpenAI's error shape, and the server goes on."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rosetool.default_model import NAME
from rosetool.serve.process import ServerProcess

LIMITS = ["--max-body-bytes", "65536", "--max-prompt-chars", "2000", "--header-timeout", "1",
          "--max-connections", "24"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--dtype", "float32", "--device", "cpu", *LIMITS]) as proc:
        yield proc


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


def completion(server, **fields) -> tuple[int, dict]:
    return post(server, "/v1/completions", json.dumps({"model": NAME, "max_tokens": 2, **fields}).encode())


def openai_error(data: dict, status: int, *fragments: str) -> str:
    assert set(data) == {"error"} and data["error"]["code"] == status, data
    message = data["error"]["message"]
    assert isinstance(data["error"]["type"], str)
    for fragment in fragments:
        assert fragment in message, message
    return message


def healthy(server) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def raw_exchange(server, head: bytes, body: bytes = b"") -> bytes:
    """Send a request's head (and part of a body), read what comes back: a client that would send more."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_body_over_the_limit_is_413_before_it_is_read(server):
    """Content-Length over the limit: 413 with nothing of the body read; a chunked body: 413 as soon as
    what arrived is over it."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = raw_exchange(server, head + b"Content-Length: 52428800\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    openai_error(json.loads(answer.split(b"\r\n\r\n", 1)[1]), 413, "52428800 bytes", "--max-body-bytes")
    piece = b"y" * 70000
    answer = raw_exchange(server, head + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%s\r\n" % (len(piece), piece))
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in answer
    assert healthy(server)


def test_prompt_over_the_limit_is_400_before_tokenising(server):
    status, data = completion(server, prompt="hello " * 500)
    openai_error(data, 400, "prompt is 3000 characters", "--max-prompt-chars")
    status, data = post(server, "/v1/chat/completions", json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "hi " * 1000}]}).encode())
    openai_error(data, 400, "messages is 3", "--max-prompt-chars")


@pytest.mark.parametrize("field,value", [("seed", 2**64), ("top_k", 2**70), ("max_tokens", 2**64)])
def test_numbers_out_of_range_are_400(server, field, value):
    status, data = completion(server, prompt="hi", **{field: value})
    openai_error(data, 400, field)
    status, data = completion(server, prompt="hi", temperature=0)
    assert status == 200 and data["choices"][0]["finish_reason"] == "length"


def test_nan_in_a_request_is_400(server):
    status, data = post(server, "/v1/completions", b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % NAME.encode())
    openai_error(data, 400, "temperature")


@pytest.mark.parametrize("body,fragment", [(b'{"model": 9,,}', "not valid JSON"),
                                           (b'{"model": "\xff\xfe"}', "not UTF-8")])
def test_broken_bodies_answer_in_openai_shape(server, body, fragment):
    status, data = post(server, "/v1/completions", body)
    openai_error(data, 400, fragment)


def test_unknown_route_is_404_in_openai_shape(server):
    status, data = post(server, "/v1/nothing", b"{}")
    openai_error(data, 404)


def test_half_sent_requests_are_dropped_and_health_recovers(server):
    """30 clients send half a request and wait: the 24-connection cap answers the excess with 503 at
    once, the header timeout (1 s) drops the rest with a 408, and /health answers again."""
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        socks.append(s)
    time.sleep(2.0)
    answers = []
    for s in socks:
        data = s.recv(65536)
        answers.append(data.split(b"\r\n", 1)[0])
        s.close()
    assert answers.count(b"HTTP/1.1 408 Request Timeout") >= 20, answers
    assert all(a in (b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 503 Service Unavailable") for a in answers), answers
    assert healthy(server)


def test_a_slow_body_is_408(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\"")
    time.sleep(1.8)
    assert s.recv(65536).startswith(b"HTTP/1.1 408")
    s.close()


class _Tokenizer:
    """Encodes slowly and says in which thread."""

    def __init__(self):
        self.threads: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.current_thread().name)
        time.sleep(1.0)
        return [1, 2, 3]


class _LLM:
    """The part of `LLM` the engine loop drives: one request that steps every 10 ms, step times kept."""

    def __init__(self):
        self.tokenizer, self.steps, self.live = _Tokenizer(), [], {"other": True}

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def step(self) -> list:
        self.steps.append(time.perf_counter())
        time.sleep(0.01)
        if len(self.steps) > 300:
            self.live.clear()
        return []

    def add_request(self, ids, params, request_id) -> None:
        self.live[request_id] = True

    def abort(self, request_id) -> None:
        self.live.pop(request_id, None)


def test_tokenising_runs_off_the_engine_thread():
    """A slow tokenisation (1 s) must not stop the engine stepping other requests meanwhile."""
    from rosetool.runtime import SamplingParams
    from rosetool.serve.engine_loop import EngineLoop

    async def scenario(llm: _LLM) -> tuple[float, float]:
        loop = EngineLoop(llm)
        loop.start()
        started = time.perf_counter()
        ids = await loop.tokenize("a long prompt")
        ended = time.perf_counter()
        assert ids == [1, 2, 3]
        await loop.add("r1", 0, ids, SamplingParams(), asyncio.Queue())
        llm.live.clear()
        await loop.stop()
        return started, ended
    llm = _LLM()
    started, ended = asyncio.run(scenario(llm))
    assert llm.tokenizer.threads == ["rosetool-tokenize_0"]
    during = [t for t in llm.steps if started < t < ended]
    assert len(during) > 20, len(during)   # ~100 steps of 10 ms fit in the 1 s tokenisation


def test_busy_port_is_one_line_before_the_model_loads(cli80, monkeypatch):
    import rosetool.runtime

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")
    monkeypatch.setattr(rosetool.runtime, "LLM", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = cli80("serve", "--port", port, "--device", "cpu")
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.code == 2 and len(lines) == 1, res.err
    assert lines[0] == f"Error: 127.0.0.1:{port} is already in use (another server?); choose another with --port"


def test_a_request_during_the_drain_gets_503(tmp_path):
    """SIGTERM while a request runs: it finishes, a new one (new connection) gets 503, exit 0."""
    proc = ServerProcess(["--dtype", "float32", "--device", "cpu"]).start()
    result: dict = {}

    def long_request() -> None:
        result["status"], result["data"] = completion(proc, prompt="hi", max_tokens=300, ignore_eos=True,
                                                      temperature=0)
    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, data = completion(proc, prompt="late")
    openai_error(data, 503, "shutting down")
    worker.join(120)
    assert result["status"] == 200 and result["data"]["usage"]["completion_tokens"] == 300
    assert proc.stop(timeout_s=60) == 0
