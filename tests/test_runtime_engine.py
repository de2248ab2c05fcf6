"""Paged engine vs transformers `generate` (greedy, fp32) on tiny random GPT-2 and Llama (GQA) models.

Weight matrices are redrawn with a large std so greedy outputs vary from token to token (the default 0.02
init makes tiny models repeat one token, which would hide cache bugs). HF runs each prompt alone and
unpadded, so the comparison has no padding effects.
"""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rosetool.errors import RosetoolError
from rosetool.runtime import LLM, SamplingParams

NEW_TOKENS = 10
VOCAB = 128


def save_random_model(model, path):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # matrices only: norms keep their unit weights
                p.normal_(0, 0.5)
    model.eval().save_pretrained(path)
    model.generation_config.eos_token_id = None  # HF runs on past EOS, like ignore_eos
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256,
                                        bos_token_id=0, eos_token_id=1))
    else:
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          max_position_embeddings=256, bos_token_id=0, eos_token_id=1))
    return path, save_random_model(hf, path)


PROMPTS = [[random.Random(i).randrange(2, VOCAB) for _ in range(n)] for i, n in enumerate([3, 9, 17, 30])]
PROMPTS.append(PROMPTS[3][:20] + [5, 6, 7])  # shares five 4-token blocks with the previous prompt


@pytest.fixture(scope="module")
def expected(tiny):
    _, hf = tiny
    return {tuple(p): hf_greedy(hf, p) for p in PROMPTS}


def hf_greedy(hf, prompt, n=NEW_TOKENS):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def check(outs, prompts, expected):
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == expected[tuple(prompt)], f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"


@pytest.mark.parametrize("options", [
    dict(), dict(enable_prefix_caching=False), dict(max_num_batched_tokens=7), dict(max_num_seqs=2),
], ids=["default", "no-prefix-cache", "chunked-prefill", "two-seqs"])
def test_batch_matches_hf(tiny, expected, options):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4, **options)
    check(llm.generate(PROMPTS, GREEDY), PROMPTS, expected)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_tiny_pool_matches_hf(tiny, expected, caching):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4, num_kv_blocks=12,
              enable_prefix_caching=caching)
    check(llm.generate(PROMPTS, GREEDY), PROMPTS, expected)
    assert llm.scheduler.num_preemptions > 0
    assert llm.scheduler.block_manager.num_free_blocks == 12


def test_prefix_cache_hits_across_requests(tiny, expected):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4)
    check(llm.generate([PROMPTS[3]], GREEDY), [PROMPTS[3]], expected)
    check(llm.generate([PROMPTS[4]], GREEDY), [PROMPTS[4]], expected)
    assert llm.scheduler.block_manager.num_hit_blocks == 5


def test_requests_arriving_mid_run(tiny, expected):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    ids = {llm.add_request(PROMPTS[0], GREEDY): PROMPTS[0]}
    arrivals = {2: PROMPTS[3], 3: PROMPTS[1], 6: PROMPTS[4]}
    step = 0
    while llm.has_unfinished() or arrivals:
        if step in arrivals:
            ids[llm.add_request(arrivals.pop(step), GREEDY)] = None
        for event in llm.step():
            tokens.setdefault(event.request_id, []).extend(event.new_token_ids)
            if event.finished:
                reasons[event.request_id] = event.finish_reason
        step += 1
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[4]]
    for rid, prompt in zip(ids, prompts):
        assert tokens[rid] == expected[tuple(prompt)] and reasons[rid] == "length"


def test_abort_frees_blocks_and_reports(tiny):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4, num_kv_blocks=32)
    keep = llm.add_request(PROMPTS[1], GREEDY)
    gone = llm.add_request(PROMPTS[2], GREEDY)
    llm.step()
    llm.abort(gone)
    events = llm.step()
    assert any(e.request_id == gone and e.finish_reason == "abort" for e in events)
    while llm.has_unfinished():
        events += llm.step()
    assert [e.finish_reason for e in events if e.request_id == keep and e.finished] == ["length"]
    assert llm.scheduler.block_manager.num_free_blocks == 32


def test_eos_and_stop_token_ids_finish_with_stop(tiny, expected):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4)
    target = expected[tuple(PROMPTS[2])]
    stop_at = target[4]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop_at])
    out = llm.generate([PROMPTS[2]], params)[0]
    assert out.finish_reason == "stop" and out.token_ids == target[: target.index(stop_at) + 1]


def test_seeded_sampling_repeats(tiny):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4)
    params = SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=NEW_TOKENS, ignore_eos=True,
                            logprobs=True)
    first, again = llm.generate([PROMPTS[1], PROMPTS[1]], [params, params])
    alone = llm.generate([PROMPTS[1]], params)[0]
    assert first.token_ids == again.token_ids == alone.token_ids
    assert len(first.logprobs) == NEW_TOKENS and all(lp <= 0 for lp in first.logprobs)


def test_prompt_longer_than_pool_is_refused(tiny):
    llm = LLM(tiny[0], dtype="float32", device="cpu", block_size=4, num_kv_blocks=4)
    with pytest.raises(RosetoolError, match="max_model_len"):
        llm.add_request(PROMPTS[3])
    with pytest.raises(RosetoolError, match="no tokenizer"):
        llm.add_request("hello")
