"""Any OpenAI-compatible `/v1/completions` server (vLLM, SGLang, ...), over the standard library only.

One thread per in-flight request (a pool sized by `--max-concurrency`) keeps the arrival schedule
honest without an async dependency. Output tokens come from the server's `usage.completion_tokens`
(asked for with `stream_options.include_usage`), falling back to one token per streamed chunk;
text is never re-tokenised. Without streaming only the end of a request is visible, so TTFT
equals E2EL and there are no ITLs.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from rosetool.bench.backends.base import BackendConfig, OnDone, OnTokens, Schedule, fail, no_tokens
from rosetool.bench.backends.model import make_vocab, model_label, resolve_model
from rosetool.bench.metrics import RequestResult
from rosetool.bench.workload import Request
from rosetool.errors import RosetoolError
from rosetool.runtime.loader import load_tokenizer


# What one answer may hold: a streamed token's SSE line is ~200 bytes and a whole 128k-token completion a
# few MB. A server sending more is broken or hostile; without a cap, one endless line fills memory long
# before --request-timeout ends the request.
MAX_LINE_BYTES = 1 << 20
MAX_BODY_BYTES = 64 << 20


class ServerError(Exception):
    """A non-200 answer or a malformed body: the request failed, the run goes on."""


def completions_path(base_path: str) -> str:
    base = base_path.rstrip("/")
    if base.endswith("/completions"):
        return base
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


class OpenAIBackend:
    name = "openai"

    def __init__(self, cfg: BackendConfig):
        if not cfg.base_url:
            raise RosetoolError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000")
        url = urlsplit(cfg.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise RosetoolError(f"--base-url {cfg.base_url!r}: expected http(s)://HOST[:PORT][/v1]")
        try:
            port = url.port
        except ValueError:   # urllib raises on a port that is not a number in 0..65535
            raise RosetoolError(f"--base-url {cfg.base_url!r}: the port is not a number in 1..65535") from None
        self.cfg, self.url = cfg, url
        self.port = port or (443 if url.scheme == "https" else 80)
        self.path = completions_path(url.path)
        self._check_reachable()
        self.model_id = cfg.served_model_name or self._served_model() or model_label(cfg)
        path = resolve_model(cfg)
        self.vocab = make_vocab(load_tokenizer(path), _config_vocab_size(path))

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        return cls(self.url.hostname, self.port, timeout=timeout)

    def _check_reachable(self) -> None:
        try:
            socket.create_connection((self.url.hostname, self.port), timeout=min(5.0, self.cfg.timeout_s)).close()
        except OSError as err:
            raise RosetoolError(f"cannot reach OpenAI-compatible server at {self.cfg.base_url}: {err}") from None

    def _served_model(self) -> str | None:
        """The first id from `/v1/models`, so `--served-model-name` is rarely needed; bounded like a request."""
        conn = self._connection(timeout=self.cfg.timeout_s)
        deadline = _Deadline(self.cfg.timeout_s)
        try:
            conn.request("GET", self.path.rsplit("/completions", 1)[0] + "/models")
            deadline.watch(conn.sock)
            resp = conn.getresponse()
            data = json.loads(_read_capped(resp)) if resp.status == 200 else {}
            return data["data"][0]["id"]
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError, ServerError):
            return None
        finally:
            deadline.cancel()
            conn.close()

    def run(self, requests: list[Request], schedule: Schedule, on_done: OnDone,
            on_tokens: OnTokens = no_tokens) -> list[RequestResult]:
        results = [RequestResult(prompt_len=r.prompt_len) for r in requests]
        workers = min(schedule.max_concurrency or len(requests), len(requests))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for request, result, at in zip(requests, results, schedule.arrivals):
                time.sleep(max(0.0, t0 + at - time.perf_counter()))
                pool.submit(self._one, request, result, on_done, on_tokens)
        return results

    def _body(self, request: Request) -> bytes:
        body = {
            "model": self.model_id,
            "prompt": request.prompt,
            "max_tokens": request.output_len,
            "temperature": self.cfg.temperature,
            "ignore_eos": self.cfg.ignore_eos,
            "seed": self.cfg.seed,
            "stream": self.cfg.stream,
        }
        if self.cfg.stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

    def _one(self, request: Request, result: RequestResult, on_done: OnDone, on_tokens: OnTokens) -> None:
        conn = self._connection(timeout=self.cfg.timeout_s)
        deadline = _Deadline(self.cfg.timeout_s)
        result.start = time.perf_counter()
        try:
            conn.request("POST", self.path, self._body(request), {"Content-Type": "application/json"})
            deadline.watch(conn.sock)   # the response may outlive `conn.sock` (it is dropped when will_close)
            resp = conn.getresponse()
            if resp.status != 200:
                raise ServerError(f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}")
            usage = _read_stream(resp, result, on_tokens) if self.cfg.stream else _read_whole(resp)
            result.end = time.perf_counter()
            result.output_tokens = _output_tokens(usage, len(result.token_times), request.output_len, self.cfg.stream)
        except Exception as err:   # a worker thread: whatever went wrong is this request's failure reason
            fail(result, deadline.error() if deadline.expired.is_set() else err)
        finally:
            deadline.cancel()
            conn.close()
            on_done(result)

    def close(self) -> None:
        """Connections are per request and already closed; the server is not ours to stop."""


class _Deadline:
    """Bounds a whole request: the socket timeout applies per read, so a server dripping one chunk a
    second would never trip it. At the deadline the socket is shut down, which ends any blocked read."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self._sock = seconds, threading.Event(), None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
        if self.expired.is_set():
            self._expire()

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def error(self) -> TimeoutError:
        return TimeoutError(f"no complete response within --request-timeout {self.seconds:g} s")

    def cancel(self) -> None:
        self._timer.cancel()


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ServerError(f"{what} is {value!r}, not a non-negative integer")
    return value


def _usage(doc: dict) -> int | None:
    usage = doc.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise ServerError(f"usage is {usage!r}, not an object")
    return _count(usage.get("completion_tokens"), "usage.completion_tokens")


def _read_stream(resp: http.client.HTTPResponse, result: RequestResult, on_tokens: OnTokens) -> int | None:
    """Stamp every SSE chunk that carries a choice; return `usage.completion_tokens` if sent.
    A stream must end with `data: [DONE]`; one that stops short is incomplete, not finished."""
    usage = None
    while raw := resp.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES:
            raise ServerError(f"stream line longer than {MAX_LINE_BYTES} bytes")
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return usage
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ServerError(f"stream chunk {payload[:80]!r} is not a JSON object")
        if chunk.get("error"):
            raise ServerError(str(chunk["error"]))
        choices = chunk.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise ServerError(f"stream chunk has choices {choices!r}, not a list")
        if choices:
            result.token_times.append(time.perf_counter())
            on_tokens(1)
        usage = _usage(chunk) if chunk.get("usage") is not None else usage
    raise ServerError("stream ended without 'data: [DONE]' (incomplete response)")


def _read_capped(resp: http.client.HTTPResponse) -> bytes:
    body = resp.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise ServerError(f"response body longer than {MAX_BODY_BYTES} bytes")
    return body


def _read_whole(resp: http.client.HTTPResponse) -> int:
    body = _read_capped(resp)
    if not body.strip():
        raise ServerError("HTTP 200 with an empty body")
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ServerError(f"response {body[:80]!r} has no choices")
    usage = _usage(data)
    if usage is None:
        raise ServerError("non-streaming response without usage.completion_tokens")
    return usage


def _output_tokens(usage: int | None, chunks: int, asked: int, stream: bool) -> int:
    """The server's count, checked against what was asked for and what was streamed."""
    if stream and chunks == 0:
        raise ServerError("stream carried no tokens")
    tokens = chunks if usage is None else usage
    if usage is not None and usage < chunks:
        raise ServerError(f"usage.completion_tokens={usage} but {chunks} token chunks were streamed")
    if tokens > asked:
        raise ServerError(f"{tokens} output tokens for max_tokens={asked}")
    return tokens


def _config_vocab_size(path: Path) -> int | None:
    try:
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
