"""`--adapter` on the runtime's commands: generate, serve and bench run the merged model."""

from __future__ import annotations

import http.client
import json

import pytest
import torch

from conftest import build_hf
from lora_models import LLAMA_TARGETS, make_adapter, peft_merged

PROMPT = [5, 17, 33, 2, 60]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A base, a strong random adapter, and peft's greedy continuation of the merged model."""
    root = tmp_path_factory.mktemp("tuned")
    base = build_hf("llama", root / "base")
    adapter = make_adapter(base, root / "adapter", r=8, lora_alpha=64, target_modules=LLAMA_TARGETS,
                           modules_to_save=["lm_head"])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = peft_merged(base, adapter).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        plain = peft_merged(base).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                           do_sample=False, pad_token_id=0, eos_token_id=None)
    want, without = out[0, len(PROMPT):].tolist(), plain[0, len(PROMPT):].tolist()
    assert want != without    # the adapter changes the continuation, so a dropped adapter shows
    return base, adapter, want


def test_generate_with_adapter_is_peft_greedy(tuned, cli):
    base, adapter, want = tuned
    res = cli("generate", base, " ".join(map(str, PROMPT)), "--adapter", adapter, "--temperature", "0",
              "--max-tokens", "6", "--dtype", "float32", "--device", "cpu")
    assert res.code == 0, res.err
    assert [int(t) for t in res.out.split()] == want


def test_serve_with_adapter_is_peft_greedy(tuned):
    from rosetool.serve.process import ServerProcess
    base, adapter, want = tuned
    with ServerProcess([str(base), "--adapter", str(adapter), "--dtype", "float32", "--device", "cpu",
                        "--served-model-name", "tuned"]) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
    tokens = reply["choices"][0]["logprobs"]["tokens"]    # a model without a tokenizer: each id as text
    assert [int(t) for t in tokens] == want, reply


def test_bench_with_adapter_records_it(tuned, cli, tmp_path):
    base, adapter, _ = tuned
    res = cli("bench", "offline", "--backend", "rosetool", "--model", base, "--adapter", adapter, "--num-prompts", "2",
              "--input-len", "6", "--output-len", "3", "--warmup", "0", "--runs", "1",
              "--save-result", tmp_path / "r.json", "--json")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "r.json").read_text())["config"]["backend"]["adapters"] == [str(adapter)]
    res = cli("bench", "offline", "--backend", "hf", "--model", base, "--adapter", adapter)
    assert res.code == 2 and "--adapter is merged by rosetool's runtime" in res.err


def test_tensor_parallel_ranks_merge_the_adapter(tuned):
    """Every rank merges the adapter into its own shard as it loads (`--tp 2`)."""
    from rosetool.runtime import LLM, SamplingParams
    base, adapter, want = tuned
    with LLM(base, dtype="float32", device="cpu", tensor_parallel_size=2, num_kv_blocks=8,
             adapters=(str(adapter),)) as llm:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == want
