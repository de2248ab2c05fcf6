"""`rosetool serve` on the default model, driven by the official `openai` client over loopback.

Greedy text must equal `rosetool generate` and transformers' `generate`; concurrent streams must be
independent; a client that leaves frees its KV blocks; bad parameters get a 400 and the server goes on.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rosetool.default_model import NAME, ensure_default_model
from rosetool.runtime import LLM, SamplingParams
from rosetool.serve.process import ServerProcess

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def default_path():
    return ensure_default_model()


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--dtype", "float32", "--device", "cpu"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def metrics(server) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def hf_greedy(path, prompt: str, n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_models_lists_the_default(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_greedy_completion_equals_generate_and_hf(client, cli, default_path):
    expected = hf_greedy(default_path, PROMPT, 12)
    result = cli("generate", default_path, PROMPT, "--temperature", "0", "--max-tokens", "12",
                 "--device", "cpu", "--dtype", "float32")
    assert result.code == 0 and result.out == expected + "\n"
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    prompt_tokens = len(AutoTokenizer.from_pretrained(default_path).encode(PROMPT))
    assert whole.usage.prompt_tokens == prompt_tokens
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_token_id_prompts_n_seed_stop_and_logprobs(client, default_path):
    ids = AutoTokenizer.from_pretrained(default_path).encode(PROMPT)
    by_text = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0).choices[0].text
    assert by_ids == by_text
    two = client.completions.create(model=NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=6, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text
    sampled = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]   # seeded: repeatable
    assert len({c.text for c in first.choices}) > 1                            # choices are not copies
    stop = by_text[3:6]
    cut = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, stop=[stop])
    assert cut.choices[0].text == by_text[: by_text.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    llm = LLM(default_path, dtype="float32", device="cpu", num_kv_blocks=16)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=True))[0]
    assert lp.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text


def test_32_concurrent_streams_are_independent(server, default_path):
    prompts = [f"Request {i} asks about {word}" for i, word in
               enumerate(["cats", "rain", "ships", "tea", "maps", "jazz", "salt", "ice"] * 4)]
    llm = LLM(default_path, dtype="float32", device="cpu", num_kv_blocks=256)
    expected = [o.text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    assert len(set(expected)) > 16

    async def one(client, prompt):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected


def wait_for(server, check, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while not check(now := metrics(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disconnect_aborts_and_frees_blocks(server, stream):
    before = metrics(server)
    assert before["rosetool_kv_cache_blocks_used"] == 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": NAME, "prompt": PROMPT * 8, "max_tokens": 900, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(3):
            assert resp.readline().startswith(b"data: ") and resp.readline() == b"\n"
    during = wait_for(server, lambda m: m["rosetool_generation_tokens_total"] > before["rosetool_generation_tokens_total"])
    assert during["rosetool_num_requests_running"] == 1 and during["rosetool_kv_cache_blocks_used"] >= 3
    conn.sock.close()   # the client goes away mid-stream
    conn.close()
    now = wait_for(server, lambda m: m["rosetool_kv_cache_blocks_used"] == 0)
    assert now["rosetool_kv_cache_blocks_used"] == 0 and now["rosetool_num_requests_running"] == 0
    assert now['rosetool_requests_finished_total{finished_reason="abort"}'] == \
        before.get('rosetool_requests_finished_total{finished_reason="abort"}', 0) + 1
    assert now["rosetool_generation_tokens_total"] < before["rosetool_generation_tokens_total"] + 900


@pytest.mark.parametrize("bad, param_hint", [
    ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must"), ({"max_tokens": "many"}, "max_tokens"), ({"logprobs": 5}, "logprobs"),
    ({"prompt": "word " * 2000}, "max_model_len"), ({"prompt": [70000]}, "vocabulary"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"top_k": 0}, "top_k"), ({"echo": True}, "echo"),
])
def test_bad_parameters_get_400_and_the_server_goes_on(client, bad, param_hint):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, extra_body=bad)   # sent as given
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and error["code"] == 400
    assert param_hint in error["message"]
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_unknown_model_is_404_and_chat_works_on_the_default_model(client, default_path):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="not-" + NAME, prompt=PROMPT, max_tokens=2)
    assert info.value.body["type"] == "not_found_error"
    # the embedded model ships a small template, so chat works with no flags
    tokenizer = AutoTokenizer.from_pretrained(default_path)
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "user: hi\n\nassistant:"
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 3
    assert reply.usage.prompt_tokens == len(tokenizer.encode(rendered))


def test_metrics_count_tokens_and_latencies(server, client):
    before = metrics(server)
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = metrics(server)
    assert after["rosetool_generation_tokens_total"] - before["rosetool_generation_tokens_total"] == 5
    assert after["rosetool_prompt_tokens_total"] - before["rosetool_prompt_tokens_total"] == 4
    assert after["rosetool_time_to_first_token_seconds_count"] - before["rosetool_time_to_first_token_seconds_count"] == 1
    assert after["rosetool_time_per_output_token_seconds_count"] - before["rosetool_time_per_output_token_seconds_count"] == 4
    assert after['rosetool_time_to_first_token_seconds_bucket{le="+Inf"}'] == after["rosetool_time_to_first_token_seconds_count"]
    assert after["rosetool_kv_cache_blocks_used"] + after["rosetool_kv_cache_blocks_free"] == \
        after["rosetool_kv_cache_blocks_total"]
    assert 0 <= after["rosetool_prefix_cache_hit_rate"] <= 1


def test_prefix_cache_hits_show_in_metrics(server, client):
    shared = "A long shared system preamble about foxes, dogs and the weather in spring. " * 4
    before = metrics(server)
    for tail in ("First question?", "Second question?"):
        client.completions.create(model=NAME, prompt=shared + tail, max_tokens=2, temperature=0)
    after = metrics(server)
    hits = after["rosetool_prefix_cache_hit_tokens_total"] - before["rosetool_prefix_cache_hit_tokens_total"]
    assert hits >= 48   # the second request reuses the full 16-token blocks of the shared preamble
    assert 0 < after["rosetool_prefix_cache_hit_rate"] <= 1


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


@pytest.fixture(scope="module")
def even_vocab_llama(default_path, tmp_path_factory):
    """A tiny GQA Llama with the default model's tokenizer and one spare embedding row: TP ranks split
    the vocabulary, and GPT-2's 50257 does not split in two."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50258,
                                         max_position_embeddings=128, eos_token_id=50256, bos_token_id=50256))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    path = tmp_path_factory.mktemp("tp-serve")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_path).save_pretrained(path)
    return path


def test_serve_with_tensor_parallel_ranks(even_vocab_llama):
    """`serve --tp 2`: the HTTP process is rank 0 of two; greedy text equals transformers', and the other
    rank exits with the server."""
    expected = hf_greedy(even_vocab_llama, PROMPT, 12)
    served = ["--served-model-name", NAME, "--dtype", "float32", "--device", "cpu", "--tp", "2"]
    with ServerProcess([str(even_vocab_llama), *served]) as proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected
        ranks = _children(proc.proc.pid)
        assert ranks, "no tensor-parallel rank process under the server"
        assert proc.stop() == 0
    deadline = time.monotonic() + 30
    while [pid for pid in ranks if Path(f"/proc/{pid}").exists()] and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in ranks if Path(f"/proc/{pid}/stat").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"rank processes {alive} outlived the server"
