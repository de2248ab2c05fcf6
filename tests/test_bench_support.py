"""Shared fixtures for the bench tests: a tiny GPT-2 with a word-level tokenizer, and a stub server.

Built locally (never downloaded) so the tests run offline. The stub speaks just enough of the
OpenAI completions protocol: `/v1/models`, and `/v1/completions` streaming (one SSE chunk per
token, then a usage chunk and `[DONE]`) or not. It binds 127.0.0.1 on an ephemeral port and
shuts down with the fixture.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "once", "upon", "a", "time"]


def write_tiny_gpt2(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    for i, word in enumerate(WORDS + [f"w{k}" for k in range(128 - 3 - len(WORDS))]):
        vocab[word] = i + 3
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=256, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


class StubHandler(BaseHTTPRequestHandler):
    """Echoes `max_tokens` tokens; a prompt equal to [13] gets an HTTP 500 to exercise failures."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "stub-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.active += 1
            self.server.max_active = max(self.server.max_active, self.server.active)
        try:
            self._complete(body)
        finally:
            with self.server.lock:
                self.server.active -= 1

    def _complete(self, body: dict) -> None:
        time.sleep(0.01)  # long enough for concurrent requests to overlap
        if body["prompt"] == [13]:
            self._send(500, {"error": "boom"})
            return
        n = int(body["max_tokens"])
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        if not body.get("stream"):
            self._send(200, {"choices": [{"text": " x" * n, "index": 0, "finish_reason": "length"}], "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(n):
            chunk = {"choices": [{"text": " x", "index": 0, "finish_reason": "length" if k == n - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if body.get("stream_options", {}).get("include_usage"):
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.bodies, server.active, server.max_active, server.lock = [], 0, 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
