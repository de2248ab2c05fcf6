"""Chat over HTTP: `rosetool serve` on a model with a chat template answers like transformers'
apply_chat_template + generate, streaming or not; `--chat-template` overrides; SIGTERM drains."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from chat_model import OTHER_TEMPLATE, build_chat_model, hf_chat_greedy
from rosetool.serve.app import RefuseWhileDraining
from rosetool.serve.process import ServerProcess

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_hf(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat") / "hf")


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_chat_equals_transformers_streaming_or_not(chat_hf):
    expected = hf_chat_greedy(chat_hf, MESSAGES, max_new_tokens=10)
    with ServerProcess([str(chat_hf), "--served-model-name", "tiny-chat", "--dtype", "float32"]) as server:
        client = client_of(server)
        whole = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                               logprobs=True)
        choice = whole.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == expected
        assert len(choice.logprobs.content) == whole.usage.completion_tokens == 10
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
        chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_completion_tokens=10,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == 10
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=2)
        assert "messages must not be empty" in info.value.body["message"]


def test_serves_a_megatron_folder_with_the_template_it_carried(chat_hf, tmp_path, cli):
    megatron = tmp_path / "megatron"
    assert cli("convert", "hf-to-megatron", chat_hf, megatron, "--tp", "2").code == 0
    expected = hf_chat_greedy(chat_hf, MESSAGES, max_new_tokens=8)
    with ServerProcess([str(megatron), "--served-model-name", "m", "--dtype", "float32"]) as server:
        reply = client_of(server).chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == expected


def test_chat_template_override(chat_hf, tmp_path):
    override = tmp_path / "other.jinja"
    override.write_text(OTHER_TEMPLATE)
    expected = hf_chat_greedy(chat_hf, MESSAGES, max_new_tokens=6, template=OTHER_TEMPLATE)
    assert expected != hf_chat_greedy(chat_hf, MESSAGES, max_new_tokens=6)
    with ServerProcess([str(chat_hf), "--chat-template", str(override), "--dtype", "float32"]) as server:
        reply = client_of(server).chat.completions.create(model=str(chat_hf), messages=MESSAGES, max_tokens=6,
                                                          temperature=0)
        assert reply.choices[0].message.content == expected


def test_sigterm_drains_in_flight_requests(chat_hf):
    server = ServerProcess([str(chat_hf), "--served-model-name", "m", "--dtype", "float32"]).start()
    started, results = threading.Event(), {}

    def long_stream() -> None:
        stream = client_of(server).completions.create(model="m", prompt="Once", max_tokens=60, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            started.set()
        results["finish"] = chunks[-1].choices[0].finish_reason
        results["chunks"] = len(chunks)

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    t0 = time.monotonic()
    code = server.stop(timeout_s=120)
    thread.join(10)
    assert results == {"finish": "length", "chunks": 60}   # the stream ran to its end after SIGTERM
    assert code == 0 and time.monotonic() - t0 < 120


def test_draining_answers_503_with_an_openai_body():
    sent = []

    async def app(scope, receive, send):   # must not be reached while draining
        raise AssertionError("request passed a draining server")

    class State:
        draining = True

    async def send(message):
        sent.append(message)

    middleware = RefuseWhileDraining(app, State())
    asyncio.run(middleware({"type": "http", "path": "/v1/completions"}, None, send))
    assert sent[0]["status"] == 503
    assert b'"type":"service_unavailable"' in sent[1]["body"] and b'"code":503' in sent[1]["body"]
