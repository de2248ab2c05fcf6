"""Host resources for the CPU runtime: thread count, a KV pool sized from free memory and the workload,
lazily backed; and greedy parity on the attention fast paths (equal-length decode, GQA, sliding window)."""

import logging
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from rosetool.errors import RosetoolError
from rosetool.runtime import LLM, SamplingParams, host, model_runner

VOCAB = 90


def save_random(model, path):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5) if p.dim() >= 2 else p.uniform_(0.5, 1.5)   # norms randomised too
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["llama-gqa6", "mistral-window"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    common = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                  vocab_size=VOCAB, max_position_embeddings=96, bos_token_id=0, eos_token_id=1)
    if request.param == "llama-gqa6":
        hf = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **common))
    else:
        hf = MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=5, **common))
    return path, save_random(hf, path)


def greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_equal_length_batch_matches_hf(model):
    path, hf = model
    prompts = [[random.Random(i).randrange(2, VOCAB) for _ in range(11)] for i in range(4)]
    outs = LLM(path, dtype="float32", device="cpu", block_size=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy(hf, p, 9) for p in prompts]


def test_pool_is_capped_by_max_num_seqs_full_contexts(model):
    llm = LLM(model[0], dtype="float32", device="cpu", block_size=4, max_num_seqs=3, max_model_len=41)
    assert llm.runner.num_kv_blocks == 3 * 11 and llm.max_model_len == 41


def test_small_free_memory_lowers_max_model_len_with_warning(model, monkeypatch, caplog):
    path, hf = model
    block = 2 * 2 * 4 * hf.config.num_key_value_heads * 8 * 4   # K and V, 2 layers, 4 tokens, head_dim 8, fp32
    monkeypatch.setattr(model_runner, "available_memory", lambda: 7 * block)
    with caplog.at_level(logging.WARNING, logger=model_runner.__name__):
        llm = LLM(path, dtype="float32", device="cpu", block_size=4, gpu_memory_utilization=0.5)
    assert llm.runner.num_kv_blocks == 3 and llm.max_model_len == 12
    assert "max_model_len lowered from 96 to 12" in caplog.text
    prompt = [5, 17, 33, 2, 70]
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert out.token_ids == greedy(hf, prompt, 6)
    monkeypatch.setattr(model_runner, "available_memory", lambda: block // 2)
    with pytest.raises(RosetoolError, match="one KV block"):
        LLM(path, dtype="float32", device="cpu", block_size=4)


def test_cpu_threads_follow_affinity_or_the_environment(monkeypatch):
    monkeypatch.delenv("ROSETOOL_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert host.cpu_threads() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.6, 0.0, 0.0))   # others keep all but one busy
    assert host.cpu_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 9.0, 0.0, 0.0))
    assert host.cpu_threads() == 1
    monkeypatch.setenv("ROSETOOL_NUM_THREADS", "3")
    assert host.cpu_threads() == 3
    monkeypatch.setenv("ROSETOOL_NUM_THREADS", "zero")
    with pytest.raises(RosetoolError, match="ROSETOOL_NUM_THREADS"):
        host.cpu_threads()


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def test_lazily_zeroed_pool_is_backed_only_where_written():
    before = _rss()
    pool = host.lazily_zeroed((8, 1024, 1024, 8), torch.float32)   # 256 MiB
    assert pool.sum().item() == 0 and _rss() - before < 32 << 20
    pool[3, :100] = 2.0
    assert pool.sum().item() == 2.0 * 100 * 1024 * 8 and _rss() - before < 48 << 20
