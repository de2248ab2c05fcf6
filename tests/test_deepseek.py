"""DeepSeek-V2/V3: multi-head latent attention with a latent paged KV cache, and DeepSeek's MoE routing,
each checked against transformers.

Every case is a tiny random transformers model with odd sizes and every parameter and buffer redrawn (norm
weights, biases and V3's expert-choice bias too), so a swapped or dropped tensor cannot hide. Across the
cases each flag appears both ways: q LoRA, interleaved rotary, attention bias, renormalised top-k, expert
groups, YaRN with mscale, first_k_dense_replace, tied embeddings, V2's greedy and group-limited routing.
The model's rms_norm_eps differs from the latent norms' fixed 1e-6, so confusing the two shows.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from family_checks import (check_bench_offline, check_inspect, check_logits_at_lengths,
                           check_paged_greedy_equals_hf_generate, check_verify_and_export, convert_case, tensors)
from rosetool.converters.api import convert
from rosetool.runtime import LLM

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=45, intermediate_size=70, moe_intermediate_size=22, num_hidden_layers=3,
            num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=14,
            qk_rope_head_dim=6, v_head_dim=10, qk_nope_head_dim=12, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}
CASES = {   # name -> (model_type, config, facts `inspect` must report)
    "v3-qlora-grouped": ("deepseek_v3", {**BASE, "q_lora_rank": 20, "n_group": 4, "topk_group": 2},
                         ["q LoRA rank 20", "interleaved pairs", "best 2 of 4 expert groups", "best two summed",
                          "latent 14 + rotary 6 = 20 values", "weights times 2.5", "renormalised"]),
    "v3-direct-yarn-bias-tied": ("deepseek_v3", {**BASE, "q_lora_rank": None, "rope_interleave": False,
                                                 "attention_bias": True, "norm_topk_prob": False, "n_group": 1,
                                                 "topk_group": 1, "first_k_dense_replace": 0, "rope_parameters": YARN,
                                                 "tie_word_embeddings": True, "routed_scaling_factor": 1.0},
                                 ["q projected directly", "rotate-half pairs", "YaRN RoPE: factor 4.0",
                                  "raw sigmoid weights", "mscale_all_dim 0.707", "(dense: none)"]),
    "v2-greedy-yarn": ("deepseek_v2", {**BASE, "q_lora_rank": None, "topk_method": "greedy",
                                       "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
                       ["q projected directly", "interleaved pairs", "raw softmax weights", "YaRN RoPE"]),
    "v2-grouped-qlora": ("deepseek_v2", {**BASE, "q_lora_rank": 18, "topk_method": "group_limited_greedy",
                                         "n_group": 4, "topk_group": 2, "n_shared_experts": 2,
                                         "routed_scaling_factor": 1.7, "first_k_dense_replace": 2,
                                         "num_hidden_layers": 4},
                         ["q LoRA rank 18", "best 2 of 4 expert groups (a group scores its best expert)",
                          "weights times 1.7", "ffn 44", "(dense: [0, 1])"]),
}


def build(model_type, config, folder, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            else:   # norm weights around 1, biases (the expert-choice bias too) around 0, all distinct
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def load_hf(folder):
    """The plain per-expert loop: transformers' grouped_mm path needs 16-byte strides the odd sizes lack."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return convert_case(request, tmp_path_factory, CASES, build)


def test_logits_match_transformers_at_several_lengths(case):
    name, hf, native, _ = case
    ref_model = load_hf(hf)
    check_logits_at_lengths(name, lambda tokens: ref_model(tokens).logits, native, VOCAB)


def test_hf_native_hf_is_bit_identical(case, tmp_path):
    name, hf, native, _ = case
    convert(native, tmp_path / "back", "hf")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys(), name
    assert all(torch.equal(a[k], b[k]) for k in a), name
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_hf(hf)(tokens).logits, load_hf(tmp_path / "back")(tokens).logits), name
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf, tmp_path / "back"))
    for key in ("model_type", "architectures", "rope_parameters", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "topk_method", "first_k_dense_replace",
                "n_shared_experts", "routed_scaling_factor", "norm_topk_prob", "rope_interleave", "attention_bias",
                "tie_word_embeddings", "rms_norm_eps"):
        assert src.get(key) == out.get(key), (name, key)


def test_paged_greedy_generation_matches_hf_generate(case):
    name, hf_path, native, _ = case
    check_paged_greedy_equals_hf_generate(name, load_hf(hf_path), native, VOCAB)


def test_the_paged_cache_holds_the_latent_not_expanded_kv(case):
    """One cache tensor of kv_lora_rank + qk_rope_head_dim per token and layer; V is a view of its first dims."""
    name, _, native, _ = case
    llm = LLM(native, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32)
    attn = llm.runner.attention
    layers = llm.runner.args.num_layers
    assert tuple(attn.k_cache.shape) == (layers, 32, 4, 1, 14 + 6), name
    assert attn.v_cache.data_ptr() == attn.k_cache.data_ptr() and attn.v_cache.shape[-1] == 14, name
    assert llm.runner._block_bytes() == layers * 4 * 20 * 4, name   # vs 2 * 3 heads * 18 dims expanded


def test_verify_and_export_hf_work_on_the_family(case, cli, tmp_path):
    name, hf, native, _ = case
    check_verify_and_export(name, cli, hf, native, tmp_path)


def test_bench_offline_runs_the_family(case, cli):
    name, _, native, _ = case
    check_bench_offline(name, cli, native)


def test_inspect_explains_the_family(case, cli):
    name, hf, native, facts = case
    check_inspect(name, cli, hf, native, facts)


def test_tensor_parallel_is_refused_before_any_process_starts(case, cli):
    name, _, native, _ = case
    res = cli("generate", native, "3 4", "--tp", "2", "--max-tokens", "2")
    assert res.code == 2 and "does not divide num_heads=3" in res.err + res.out, res.err + res.out


REFUSED = {   # name -> (model_type, config.json edit, what the one-line error must name)
    "moe-layer-freq": ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq other than 1"),
    "v2-renormalised": ("deepseek_v2", {"norm_topk_prob": True}, "unsupported norm_topk_prob=True"),
    "v2-noaux": ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc' is not implemented for DeepSeek-V2"),
    "v3-greedy": ("deepseek_v3", {"topk_method": "greedy"}, "topk_method other than noaux_tc"),
    "v3-softmax": ("deepseek_v3", {"scoring_func": "softmax"}, "unsupported scoring_func='softmax'"),
    "kv-heads": ("deepseek_v3", {"num_key_value_heads": 1}, "num_kv_heads=1 must equal num_heads=3"),
    "groups": ("deepseek_v3", {"n_group": 3, "topk_group": 1}, "the groups must divide the experts"),
    "few-groups": ("deepseek_v3", {"n_group": 4, "topk_group": 1}, "num_experts_per_tok=3 is more than"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_settings_the_runtime_lacks_are_refused_by_name(name, cli, tmp_path):
    model_type, edit, message = REFUSED[name]
    hf = build(model_type, {**BASE, "q_lora_rank": None, "n_group": 1, "topk_group": 1}, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, **edit}))
    res = cli("convert", "hf-to-native", hf, tmp_path / "native")
    assert res.code == 2 and message in res.err + res.out, res.err + res.out
    assert "Traceback" not in res.err + res.out and "config.json" in res.err + res.out


def test_a_hub_style_config_reads_as_the_model_transformers_builds(cli, tmp_path):
    """Hub configs of DeepSeek-V3 / Kimi-K2 / Moonlight are transformers 4.x-era: `rope_scaling` with `type`, and the
    remote code's `scoring_func`, `topk_method`, `moe_layer_freq`, `aux_loss_alpha`, ... all known to rosetool."""
    config = {**BASE, "q_lora_rank": 20, "n_group": 2, "topk_group": 1, "rope_parameters": YARN}
    hf = build("deepseek_v3", config, tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    hub = {**raw, "rope_theta": rope.pop("rope_theta"), "rope_scaling": {"type": rope.pop("rope_type"), **rope},
           "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "aux_loss_alpha": 0.001,
           "seq_aux": True, "ep_size": 1, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
           "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}
    (hf / "config.json").write_text(json.dumps(hub))
    info = json.loads(cli("inspect", hf, "--json").out)
    assert info["unknown_config_fields"] == [] and info["config"]["rope_scaling"]["rope_type"] == "yarn"
    convert(hf, tmp_path / "native", "native")
    from rosetool.runtime.model import load_model
    model, _ = load_model(tmp_path / "native", torch.float32)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    hub_model = load_hf(hf)   # transformers reads the same hub-style file
    with torch.no_grad():
        assert (hub_model(tokens).logits - model(tokens)).abs().max() < 1e-4


def test_routers_keep_fp32_weights_when_the_model_runs_in_bf16(case):
    """As transformers does: the rest of the model in bf16, router weight and choice bias exactly as stored."""
    from rosetool.runtime.model import load_model
    from rosetool.runtime.moe import Router
    name, hf, native, _ = case
    model, _ = load_model(native, torch.bfloat16)
    stored = tensors(native)
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
    assert routers and model.embed.weight.dtype == torch.bfloat16, name
    for n, router in routers:
        assert router.weight.dtype == torch.float32 and torch.equal(router.weight, stored[f"{n}.weight"]), name
        if router.choice_bias is not None:
            assert torch.equal(router.choice_bias, stored[f"{n}.choice_bias"]), name
    with torch.no_grad():
        assert model(torch.tensor([[3, 5, 7]])).dtype == torch.bfloat16


def test_a_multi_token_prediction_layer_is_refused_by_name(cli, tmp_path):
    """DeepSeek-V3's hub checkpoints keep an MTP layer after the last decoder layer; it is named, not just "unexpected"."""
    from safetensors.torch import save_file
    hf = build("deepseek_v3", {**BASE, "q_lora_rank": None, "n_group": 1, "topk_group": 1}, tmp_path / "hf")
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(45, 90), "model.layers.3.enorm.weight": torch.ones(45)}
    index = {"metadata": {}, "weight_map": {**{k: "model.safetensors" for k in tensors(hf)},
                                            **{k: "mtp.safetensors" for k in mtp}}}
    save_file(mtp, hf / "mtp.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    res = cli("convert", "hf-to-native", hf, tmp_path / "native")
    text = res.err + res.out
    assert res.code == 2 and "mtp.safetensors: tensor 'model.layers.3." in text and "(2 under model.layers.3.*)" in text
    assert "multi-token-prediction layer" in " ".join(text.split()) and "Traceback" not in text
