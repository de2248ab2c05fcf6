"""The openai bench backend against a server that misbehaves: every malformed or incomplete answer is a
failed request with its reason, `--request-timeout` bounds the whole request, token counts are checked."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from rosetool.bench.backends.base import BackendConfig, Schedule
from rosetool.bench.backends.openai import OpenAIBackend
from rosetool.bench.workload import Request
from rosetool.cli.bench import app
from test_bench_support import tiny_model  # noqa: F401  (fixture)


def chunk(text: str = " x") -> bytes:
    return f"data: {json.dumps({'choices': [{'text': text, 'index': 0}]})}\n\n".encode()


def usage(n: object) -> bytes:
    return f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n".encode()


DONE = b"data: [DONE]\n\n"

# mode -> (streamed body parts, or a whole JSON body for --no-stream), reason expected in the error
STREAMED = {
    "list chunk": ([b"data: [1,2]\n\n", DONE], "is not a JSON object"),
    "null chunk": ([b"data: null\n\n", DONE], "is not a JSON object"),
    "string chunk": ([b'data: "hi"\n\n', DONE], "is not a JSON object"),
    "invalid JSON": ([b"data: {oops\n\n", DONE], "JSONDecodeError"),
    "negative usage": ([chunk(), chunk(), chunk(), usage(-1000), DONE], "usage.completion_tokens is -1000"),
    "usage as string": ([chunk(), usage("3"), DONE], "usage.completion_tokens is '3'"),
    "usage as float": ([chunk(), usage(2.5), DONE], "usage.completion_tokens is 2.5"),
    "usage not an object": ([chunk(), b'data: {"choices": [], "usage": 3}\n\n', DONE], "usage is 3"),
    "usage below what streamed": ([chunk(), chunk(), chunk(), usage(1), DONE], "usage.completion_tokens=1 but 3"),
    "more tokens than asked": ([chunk(), usage(10), DONE], "10 output tokens for max_tokens=3"),
    "choices not a list": ([b'data: {"choices": 5}\n\n', DONE], "choices 5, not a list"),
    "empty 200": ([], "without 'data: [DONE]'"),
    "no [DONE]": ([chunk(), chunk(), chunk()], "without 'data: [DONE]'"),
    "only [DONE]": ([DONE], "stream carried no tokens"),
    "error chunk": ([b'data: {"error": "overloaded"}\n\n', DONE], "overloaded"),
}
OK = [chunk(), chunk(), chunk(), usage(3), DONE]
WHOLE = {
    "empty 200": (b"", "empty body"),
    "list body": (b"[1, 2]", "has no choices"),
    "no usage": (json.dumps({"choices": [{"text": "x"}]}).encode(), "without usage.completion_tokens"),
    "negative usage": (json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": -5}}).encode(),
                       "usage.completion_tokens is -5"),
    "bool usage": (json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": True}}).encode(),
                   "usage.completion_tokens is True"),
}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.mode == "models drip":   # /v1/models one byte every 0.2 s: 12 s in all
            self.send_response(200)
            self.send_header("Content-Length", "60")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.2)
            return
        self._reply(json.dumps({"data": [{"id": "stub"}]}).encode())

    def _endless(self, head: bytes) -> None:
        self.wfile.write(head)
        block = b"x" * 65536
        while True:              # until the client hangs up
            self.wfile.write(block)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.server.mode
        if mode == "mixed":   # every other request stops short
            with self.server.lock:
                self.server.count += 1
                mode = "ok" if self.server.count % 2 else "no [DONE]"
        if mode == "endless" and not body["stream"]:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self._endless(b'{"choices": ["')
            return
        if not body["stream"]:
            self._reply(WHOLE[mode][0])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "drip":
            for _ in range(20):    # one chunk every 0.3 s: each read is quick, the request is not
                self.wfile.write(chunk())
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(DONE)
            return
        if mode == "endless":    # one SSE line that never ends
            self._endless(b'data: {"choices": [{"text": "')
            return
        for part in OK if mode == "ok" else STREAMED[mode][0]:
            self.wfile.write(part)

    def _reply(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass   # the client hanging up on the drip is the point, not a failure


@pytest.fixture(scope="module")
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.lock, srv.count = True, threading.Lock(), 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run_one(server, model, mode: str, stream: bool = True, timeout: float = 30.0):
    server.mode = mode
    cfg = BackendConfig(name="openai", model=model, base_url=f"http://127.0.0.1:{server.server_port}",
                        stream=stream, timeout_s=timeout)
    backend = OpenAIBackend(cfg)
    done = []
    (result,) = backend.run([Request([5, 6, 7], 3, 3)], Schedule([0.0]), done.append)
    assert done == [result]
    return result


@pytest.mark.parametrize("mode", sorted(STREAMED))
def test_malformed_stream_is_a_failed_request(server, tiny_model, mode):
    result = run_one(server, tiny_model, mode)
    assert not result.success and STREAMED[mode][1] in result.error, result.error
    assert result.end >= result.start


@pytest.mark.parametrize("mode", sorted(WHOLE))
def test_malformed_whole_response_is_a_failed_request(server, tiny_model, mode):
    result = run_one(server, tiny_model, mode, stream=False)
    assert not result.success and WHOLE[mode][1] in result.error, result.error


def test_request_timeout_bounds_the_whole_request(server, tiny_model):
    start = time.perf_counter()
    result = run_one(server, tiny_model, "drip", timeout=1.0)
    elapsed = time.perf_counter() - start
    assert not result.success and "TimeoutError: no complete response within --request-timeout 1 s" in result.error
    assert elapsed < 3.0, elapsed     # the drip alone would take 6 s
    assert 0 < len(result.token_times) < 20


@pytest.mark.parametrize("stream,reason", [(True, "stream line longer than 65536 bytes"),
                                           (False, "response body longer than 1048576 bytes")])
def test_endless_answers_are_cut_at_a_cap(server, tiny_model, monkeypatch, stream, reason):
    """One endless SSE line or --no-stream body fails the request at the cap, long before the timeout
    (uncapped, the client grew past 5 GB in seconds). Caps lowered so the test reads little."""
    from rosetool.bench.backends import openai as backend_module
    monkeypatch.setattr(backend_module, "MAX_LINE_BYTES", 65536)
    monkeypatch.setattr(backend_module, "MAX_BODY_BYTES", 1 << 20)
    start = time.perf_counter()
    result = run_one(server, tiny_model, "endless", stream=stream, timeout=20.0)
    assert not result.success and reason in result.error, result.error
    assert time.perf_counter() - start < 10


def test_models_probe_is_bounded_by_the_request_timeout(server, tiny_model):
    """/v1/models dripped a byte at a time: the probe gives up at --request-timeout and the run goes on
    with the model's own name."""
    server.mode = "models drip"
    start = time.perf_counter()
    backend = OpenAIBackend(BackendConfig(name="openai", model=tiny_model, timeout_s=1.0,
                                          base_url=f"http://127.0.0.1:{server.server_port}"))
    assert time.perf_counter() - start < 4
    assert backend.model_id != "stub"


def test_failures_are_counted_shown_and_saved(server, tiny_model):
    server.mode = "mixed"
    args = ["online", "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.server_port}", "--model",
            str(tiny_model), "--num-prompts", "4", "--input-len", "5", "--output-len", "3", "--warmup", "0",
            "--max-concurrency", "1"]
    res = CliRunner().invoke(app, args + ["--json", "--save-detailed"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["completed"] == 2 and doc["failed"] == 2
    reasons = [e for e in doc["errors"] if e]
    assert len(reasons) == 2 and all("stream ended without 'data: [DONE]'" in e for e in reasons)
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0 and "2 request(s) failed; first: ServerError: stream ended" in shown.output


def test_well_formed_stream_still_succeeds(server, tiny_model):
    result = run_one(server, tiny_model, "ok")
    assert result.success and result.output_tokens == 3 and len(result.token_times) == 3
