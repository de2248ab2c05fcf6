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
        self.cfg, self.url = cfg, url
        self.port = url.port or (443 if url.scheme == "https" else 80)
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
            socket.create_connection((self.url.hostname, self.port), timeout=5).close()
        except OSError as err:
            raise RosetoolError(f"cannot reach OpenAI-compatible server at {self.cfg.base_url}: {err}") from None

    def _served_model(self) -> str | None:
        """The first id from `/v1/models`, so `--served-model-name` is rarely needed."""
        conn = self._connection(timeout=5)
        try:
            conn.request("GET", self.path.rsplit("/completions", 1)[0] + "/models")
            resp = conn.getresponse()
            data = json.loads(resp.read()) if resp.status == 200 else {}
            return data["data"][0]["id"]
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
            return None
        finally:
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
        result.start = time.perf_counter()
        try:
            conn.request("POST", self.path, self._body(request), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ServerError(f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}")
            usage = _read_stream(resp, result, on_tokens) if self.cfg.stream else _read_whole(resp)
            result.end = time.perf_counter()
            result.output_tokens = usage if usage is not None else len(result.token_times)
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, ServerError) as err:
            fail(result, err)
        finally:
            conn.close()
            on_done(result)

    def close(self) -> None:
        """Connections are per request and already closed; the server is not ours to stop."""


def _read_stream(resp: http.client.HTTPResponse, result: RequestResult, on_tokens: OnTokens) -> int | None:
    """Stamp every SSE chunk that carries a choice; return `usage.completion_tokens` if sent."""
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("error"):
            raise ServerError(str(chunk["error"]))
        if chunk.get("choices"):
            result.token_times.append(time.perf_counter())
            on_tokens(1)
        if chunk.get("usage"):
            usage = int(chunk["usage"]["completion_tokens"])
    return usage


def _read_whole(resp: http.client.HTTPResponse) -> int:
    data = json.loads(resp.read())
    try:
        return int(data["usage"]["completion_tokens"])
    except (KeyError, TypeError):
        raise ServerError("non-streaming response without usage.completion_tokens") from None


def _config_vocab_size(path: Path) -> int | None:
    try:
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
