"""GPT-NeoX/Pythia, GPT-J, Phi-2, Phi-3, Gemma 1/2/3 and GLM-4: the families with partial or interleaved rotary, parallel
residual blocks, fused HF projections and Gemma's offset norms, each checked against transformers.

Every case is a tiny random transformers model with odd sizes; every parameter is redrawn (norm weights
and biases too) so a swapped or dropped tensor cannot hide behind an init of ones and zeros. Each boolean
flag of a family appears both ways across its cases.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import hf_logits
from family_checks import (check_bench_offline, check_inspect, check_logits_at_lengths,
                           check_paged_greedy_equals_hf_generate, check_verify_and_export, convert_case, tensors)
from rosetool.converters.api import convert

VOCAB = 96
NEOX = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=84, num_hidden_layers=2, num_attention_heads=3,
            max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
PHI3 = dict(vocab_size=VOCAB, hidden_size=110, intermediate_size=76, num_hidden_layers=2, num_attention_heads=5,
            num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)
GPTJ = dict(vocab_size=VOCAB, n_embd=70, n_layer=2, n_head=5, n_positions=128, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False)
PHI2 = dict(vocab_size=VOCAB, hidden_size=100, intermediate_size=74, num_hidden_layers=2, num_attention_heads=5,
            max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
GEMMA = dict(vocab_size=VOCAB, hidden_size=50, intermediate_size=86, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
             pad_token_id=0)
GEMMA2 = {**GEMMA, "hidden_size": 52, "num_hidden_layers": 3, "query_pre_attn_scalar": 19, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0}
GEMMA3 = {**GEMMA, "hidden_size": 52, "num_hidden_layers": 3, "query_pre_attn_scalar": 21, "sliding_window": 5}
GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
GLM = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=82, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=24, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
           pad_token_id=0)
CASES = {   # name -> (model_type, config, facts `inspect` must report)
    "neox-parallel": ("gpt_neox", {**NEOX, "rotary_pct": 0.4, "use_parallel_residual": True,
                                   "attention_bias": True}, ["rotary: first 8 of 20", "parallel residual"]),
    "neox-sequential": ("gpt_neox", {**NEOX, "rotary_pct": 0.3, "use_parallel_residual": False,
                                     "attention_bias": False, "hidden_act": "gelu_new"},
                        ["rotary: first 6 of 20", "sequential"]),
    "phi3-window": ("phi3", {**PHI3, "sliding_window": 7}, ["rotary: all 22 dims", "sequential", "sliding_window"]),
    "phi4-mini-partial-tied": ("phi3", {**PHI3, "partial_rotary_factor": 0.75, "tie_word_embeddings": True},
                               ["rotary: first 16 of 22 dims"]),
    "gptj-partial": ("gptj", {**GPTJ, "rotary_dim": 6}, ["rotary: first 6 of 14 dims per head, interleaved",
                                                        "parallel residual", "one shared norm", "bias"]),
    "gptj-full": ("gptj", {**GPTJ, "rotary_dim": 14, "n_inner": 66, "activation_function": "gelu"},
                  ["rotary: all 14 dims, interleaved", "parallel residual"]),
    "phi2-mha": ("phi", {**PHI2, "partial_rotary_factor": 0.4}, ["rotary: first 8 of 20 dims per head, rotate-half",
                                                                "one shared norm", "LM head has a bias"]),
    "phi2-gqa": ("phi", {**PHI2, "num_key_value_heads": 1, "hidden_act": "gelu"}, ["rotary: first 10 of 20"]),
    "gemma-mqa-tied": ("gemma", {**GEMMA, "num_key_value_heads": 1},
                       ["(1 + weight)", "sqrt(hidden_size)", "rotary: all 24 dims"]),
    "gemma-gqa-bias-untied": ("gemma", {**GEMMA, "attention_bias": True, "tie_word_embeddings": False,
                                        "hidden_act": "gelu"}, ["(1 + weight)", "sequential"]),
    "gemma2-capped-alternating": ("gemma2", {**GEMMA2, "sliding_window": 5, "tie_word_embeddings": False},
                                  ["sandwich norms", "attention logits soft-capped at 50.0", "final logits soft-capped at 30.0",
                                   "layers 0, 2 windowed (5), others full"]),
    "gemma2-uncapped-tied": ("gemma2", {**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                                          "query_pre_attn_scalar": 24,
                                          "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
                                          "sliding_window": 9},
                               ["sandwich norms", "layers 1, 2 windowed (9), others full"]),
    "gemma3-scaled-tied": ("gemma3_text", {**GEMMA3, "layer_types": ["sliding_attention"] * 2 + ["full_attention"],
                                           "rope_parameters": {**GEMMA3_ROPE, "full_attention": {
                                               "rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}},
                           ["q/k norm", "windowed layers 0, 1: RoPE base 10000.0", "layers 0, 1 windowed (5)"]),
    "gemma3-plain-bias-untied": ("gemma3_text", {**GEMMA3, "tie_word_embeddings": False, "attention_bias": True,
                                                 "layer_types": ["full_attention", "sliding_attention", "full_attention"],
                                                 "sliding_window": 7, "rope_parameters": {
                                                     "full_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}},
                                 ["windowed layers 1: RoPE base 500.0", "layers 1 windowed (7)"]),
    "glm-bias-gqa": ("glm", {**GLM}, ["rotary: first 12 of 24 dims per head, interleaved", "sequential"]),
    "glm4-sandwich-nobias-tied": ("glm4", {**GLM, "attention_bias": False, "tie_word_embeddings": True,
                                          "num_key_value_heads": 4, "partial_rotary_factor": 1.0},
                                  ["rotary: all 24 dims, interleaved", "sandwich norms"]),
}


def build(model_type, config, folder, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    embed = model.get_input_embeddings().weight
    # Gemma multiplies embeddings by sqrt(hidden): drawn that much smaller, as trained ones are, so a tied
    # head does not just echo the input token (which would make greedy generation prove nothing)
    embed_std = 0.3 / model.config.hidden_size ** 0.5 if model_type.startswith("gemma") else 0.3
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, embed_std if p is embed else 0.3)
            else:   # norm weights around 1, biases around 0, all distinct
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return convert_case(request, tmp_path_factory, CASES, build)


def test_logits_match_transformers_at_several_lengths(case):
    name, hf, native, _ = case
    check_logits_at_lengths(name, lambda tokens: hf_logits(hf, tokens), native, VOCAB)


def test_hf_native_hf_is_bit_identical(case, tmp_path):
    name, hf, native, _ = case
    convert(native, tmp_path / "back", "hf")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys(), name
    assert all(torch.equal(a[k], b[k]) for k in a), name
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32, pad_token_id=0).eval()
    with torch.no_grad():   # pad_token_id: Phi-3's default (32000) lies outside a tiny vocabulary
        assert torch.equal(hf_logits(hf, tokens), back(tokens).logits), name
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf, tmp_path / "back"))
    assert src["model_type"] == out["model_type"] and src["architectures"] == out["architectures"]
    for key in ("rope_parameters", "rotary_dim", "use_parallel_residual", "tie_word_embeddings", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        assert src.get(key) == out.get(key), (name, key)


def test_paged_greedy_generation_matches_hf_generate(case):
    name, hf_path, native, _ = case
    check_paged_greedy_equals_hf_generate(name, AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval(), native, VOCAB)


def test_verify_and_export_hf_work_on_the_family(case, cli, tmp_path):
    name, hf, native, _ = case
    check_verify_and_export(name, cli, hf, native, tmp_path)


def test_bench_offline_runs_the_family(case, cli):
    name, _, native, _ = case
    check_bench_offline(name, cli, native)


def test_inspect_explains_the_family(case, cli):
    name, hf, native, facts = case
    check_inspect(name, cli, hf, native, facts)


def _longrope(kind):
    return lambda cfg: {"rope_parameters": {**cfg["rope_parameters"], "rope_type": kind,
                                            "short_factor": [1.0] * 11, "long_factor": [2.0] * 11}}


REFUSED = {   # name -> (model_type, config, config.json edit, what the one-line error must name)
    "phi3-longrope": ("phi3", PHI3, _longrope("longrope"), "unsupported rope_scaling type 'longrope'"),
    "phi3-su": ("phi3", PHI3, _longrope("su"), "unsupported rope_scaling type 'su'"),
    "phi-qk-layernorm": ("phi", PHI2, lambda cfg: {"qk_layernorm": True}, "qk_layernorm=true"),
    "phi-tied": ("phi", PHI2, lambda cfg: {"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    "gptj-tied": ("gptj", {**GPTJ, "rotary_dim": 6}, lambda cfg: {"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    "gptj-no-rotary-dim": ("gptj", {**GPTJ, "rotary_dim": 6}, lambda cfg: {"rotary_dim": None}, "rotary_dim=null"),
    "neox-odd-rotary": ("gpt_neox", NEOX, lambda cfg: {"rope_parameters": {**cfg["rope_parameters"],
                                                                           "partial_rotary_factor": 0.25}},
                        "rotates 5 of head_dim=20 dims"),
    "gemma-bidirectional": ("gemma", GEMMA, lambda cfg: {"use_bidirectional_attention": True},
                            "use_bidirectional_attention=true"),
    "gemma-hidden-activation": ("gemma", GEMMA, lambda cfg: {"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"},
                                "hidden_activation differs from hidden_act"),
    "gemma3-scaled-local-rope": ("gemma3_text", {**GEMMA3, "rope_parameters": GEMMA3_ROPE}, lambda cfg: {
        "rope_parameters": {**cfg["rope_parameters"], "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                            "rope_theta": 10000.0}}},
        "rope_parameters.sliding_attention.rope_type='linear'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_settings_the_runtime_lacks_are_refused_by_name(name, cli, tmp_path):
    model_type, config, edit, message = REFUSED[name]
    hf = build(model_type, config, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, **edit(cfg)}))
    res = cli("convert", "hf-to-native", hf, tmp_path / "native")
    assert res.code == 2 and message in res.err + res.out, res.err + res.out
    assert "Traceback" not in res.err + res.out and "config.json" in res.err + res.out
