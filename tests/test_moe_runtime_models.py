"""Whole MoE models, HF -> native through the converter -> the runtime, against transformers (fp32).

Tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models with varied shapes: odd widths (the grouped
kernel's loop path) beside 16-byte-aligned ones (its F.grouped_mm path), renormalised top-k both ways, top-1,
a sliding window, a shared expert with and without dense layers beside it. Every weight is redrawn (norms around 1, biases
around 0, matrices with a large std) so a swapped tensor shows and greedy outputs change from token to token.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rosetool.converters.api import convert
from rosetool.runtime import LLM, SamplingParams
from rosetool.runtime.model import load_model
from rosetool.runtime.moe import MoE, reference_experts

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
MODELS = {   # name -> (model_type, config overrides)
    "mixtral": ("mixtral", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_local_experts=4,
                                num_experts_per_tok=2)),
    "mixtral_window": ("mixtral", dict(hidden_size=40, intermediate_size=30, num_hidden_layers=2, num_local_experts=3,
                                       num_experts_per_tok=1, sliding_window=5)),
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=40, intermediate_size=56, moe_intermediate_size=22,
                                    shared_expert_intermediate_size=36, num_hidden_layers=3, num_experts=6,
                                    num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen2_moe_sparse_step": ("qwen2_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=24, num_hidden_layers=4,
                                                num_experts=5, num_experts_per_tok=3, norm_topk_prob=True,
                                                decoder_sparse_step=2)),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=32, head_dim=12, intermediate_size=40, moe_intermediate_size=24,
                                    num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                    mlp_only_layers=[0])),
    "qwen3_moe_plain_topk": ("qwen3_moe", dict(hidden_size=36, head_dim=8, intermediate_size=40,
                                               moe_intermediate_size=20, num_hidden_layers=2, num_experts=7,
                                               num_experts_per_tok=2, norm_topk_prob=False)),
    "olmoe": ("olmoe", dict(hidden_size=48, intermediate_size=28, num_hidden_layers=2, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=False)),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(noise * 0.3)
            elif "norm" in name:
                p.copy_(1 + noise * 0.3)
            else:
                p.copy_(noise * 0.5)


def load_hf(folder: Path):
    """transformers' plain per-expert loop: its default grouped_mm kernel fails on CPU for widths whose rows
    are not whole 16-byte units (qwen2_moe's 22 below), which the runtime handles."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


def build_moe_hf(name: str, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, overrides = MODELS[name]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **overrides}))
    randomise(model)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(MODELS))
def moe_model(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    hf = build_moe_hf(request.param, root / "hf")
    convert(hf, root / "native", "native")
    return request.param, hf, root / "native"


def test_native_folder_holds_the_layer_kinds_of_the_source(moe_model):
    from transformers import AutoConfig
    name, hf, native = moe_model
    model, _ = load_model(native, torch.float32)
    hf_config = AutoConfig.from_pretrained(hf)
    for i, block in enumerate(model.layers):
        step = getattr(hf_config, "decoder_sparse_step", 1)
        hf_is_moe = i not in getattr(hf_config, "mlp_only_layers", []) and (i + 1) % step == 0
        assert (block.moe is not None) == hf_is_moe, (name, i)
        assert (block.mlp is None) == hf_is_moe, (name, i)


def test_logits_match_transformers_at_several_lengths(moe_model):
    name, hf, native = moe_model
    model, _ = load_model(native, torch.float32)
    reference = load_hf(hf)
    gen = torch.Generator().manual_seed(1)
    for length in (1, 6, 23, 41):
        tokens = torch.randint(0, VOCAB, (2, length), generator=gen)
        with torch.no_grad():
            ref, got = reference(tokens).logits, model(tokens)
        assert (ref - got).abs().max() < 1e-4, (name, length, (ref - got).abs().max())
        assert torch.equal(ref.argmax(-1), got.argmax(-1)), (name, length)


def test_reference_kernel_gives_the_same_logits(moe_model):
    name, _, native = moe_model
    model, _ = load_model(native, torch.float32)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        grouped = model(tokens)
        for m in model.modules():
            if isinstance(m, MoE):
                m.kernel = reference_experts
        reference = model(tokens)
    assert (grouped - reference).abs().max() < 1e-4, name


NEW_TOKENS = 8
PROMPTS = [[random.Random(i).randrange(2, VOCAB) for _ in range(n)] for i, n in enumerate([2, 9, 14, 27])]
PROMPTS.append(PROMPTS[3][:20] + [5, 6, 7])   # shares five 4-token blocks with the previous prompt
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def hf_greedy(hf_folder: Path) -> dict[tuple[int, ...], list[int]]:
    hf = load_hf(hf_folder)
    hf.generation_config.eos_token_id = None
    out = {}
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out[tuple(p)] = ids[0, len(p):].tolist()
    return out


@pytest.fixture(scope="module")
def expected(moe_model):
    return hf_greedy(moe_model[1])


@pytest.mark.parametrize("source, options", [
    ("native", dict()),
    ("native", dict(num_kv_blocks=12)),                         # too few blocks: preemption by recompute
    ("native", dict(num_kv_blocks=12, enable_prefix_caching=False, max_num_batched_tokens=7)),
    ("hf", dict()),                                             # converted in memory at load time
], ids=["batched-prefix-cache", "preemption", "preemption-chunked-no-cache", "hf-folder"])
def test_paged_engine_greedy_equals_hf_generate(moe_model, expected, source, options):
    name, hf, native = moe_model
    llm = LLM(native if source == "native" else hf, dtype="float32", device="cpu", block_size=4, **options)
    warm = llm.generate([PROMPTS[3]], GREEDY)     # leaves its blocks in the prefix cache
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip([PROMPTS[3]] + PROMPTS, warm + outs):
        assert out.token_ids == expected[tuple(prompt)], (name, len(prompt))
    if "num_kv_blocks" in options:
        assert llm.scheduler.num_preemptions > 0
    elif options.get("enable_prefix_caching", True):
        assert llm.scheduler.block_manager.num_hit_blocks >= 10   # PROMPTS[3] again, PROMPTS[4] shares 5 blocks
    assert len({tuple(t) for t in expected.values()}) > 1          # outputs differ by prompt
    assert any(len(set(t)) > 2 for t in expected.values())          # and are not one repeated token


def test_runtime_loads_a_megatron_checkpoint_with_expert_parallel_ranks(tmp_path, cli):
    """Any format through the specs: TP=2 x EP=2 rank folders straight into the runtime, no HF in between."""
    hf = build_moe_hf("qwen2_moe", tmp_path / "hf")
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", 2, "--ep", 2).code == 0
    model, info = load_model(tmp_path / "mg", torch.float32)
    assert info.format == "megatron"
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = load_hf(hf)(tokens).logits, model(tokens)
    assert (ref - got).abs().max() < 1e-4
