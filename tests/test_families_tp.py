"""Tensor parallelism for the families beyond Llama: two gloo ranks give the same greedy tokens as one rank
and as transformers' `generate`, for every kind of block the families bring (parallel residual with one or
two norms, partial and interleaved rotary, sandwich norms, soft-capping, q/k norm, head_dim != hidden/heads,
MQA whose single KV head is replicated, biases on QKV, MLP and LM head, tied and untied heads).

Head counts are made even (the families' own tests use odd ones), so that two ranks divide them.
"""

import pytest
import torch

from conftest import tp_workers
from rosetool.runtime import LLM, SamplingParams
from test_families import CASES, build

NEW_TOKENS = 6
PROMPTS = [[5, 17, 33, 2, 61, 40, 8], [70, 3, 3, 12], list(range(20, 45))]
EVEN = {   # family case -> overrides that make heads, MLP width and vocabulary split over two ranks
    "neox-parallel": {"num_attention_heads": 4},
    "neox-sequential": {"num_attention_heads": 4},
    "phi3-window": {"hidden_size": 112, "num_attention_heads": 4},
    "gptj-partial": {"n_embd": 72, "n_head": 4},
    "phi2-gqa": {"num_attention_heads": 4},
    "gemma-mqa-tied": {},
    "gemma2-capped-alternating": {},
    "gemma3-plain-bias-untied": {},
    "glm-bias-gqa": {},
    "glm4-sandwich-nobias-tied": {},
}


@pytest.mark.parametrize("case", sorted(EVEN))
def test_two_ranks_match_one_rank_and_transformers(case, tmp_path):
    model_type, config, _ = CASES[case]
    path = build(model_type, {**config, **EVEN[case]}, tmp_path / case)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None     # run on past EOS, like ignore_eos (not suppressing it)
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=24)
    single = [o.token_ids for o in LLM(path, **options).generate(PROMPTS, greedy)]
    with LLM(path, tensor_parallel_size=2, **options) as llm:
        assert llm.model.args.num_heads * 2 == llm.model_args.num_heads     # rank 0 holds half the heads
        two = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    assert two == single == expected
    assert not tp_workers()
