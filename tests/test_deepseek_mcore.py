"""megatron-core 0.16.1's MLA + MoE (local spec, CPU) against transformers' DeepseekV3: the layout rosetool's
Megatron DeepSeek format must write, pinned before the converter exists. The key map below is the oracle the
converter is later held to; a wrong split of kv_up (k_nope | v), of kv_down (latent | rope) or a misread
router would move the logits."""

from __future__ import annotations

import argparse

import pytest
import torch

import megatron_ref as ref

VOCAB, IDS = 96, torch.tensor([[3, 17, 90, 5, 41, 41, 8, 77, 2]])


@pytest.fixture
def mcore():
    with ref.single_process():
        yield


def hf_config(version: int, q_lora: bool, grouped: bool = False, rope_interleave: bool = True):
    """V3: sigmoid routing with a correction bias over 4 groups, top-2 groups; V2-Lite-like: softmax over all
    experts, raw (unnormalised) weights, greedy top-k or (`grouped`, V2's group_limited_greedy) top-2 of 4
    groups by their best expert; both YaRN with mscale, q LoRA either way."""
    from transformers import DeepseekV2Config, DeepseekV3Config
    common = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=44, moe_intermediate_size=14, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=version - 1, n_routed_experts=8,
        routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=18, q_lora_rank=22 if q_lora else None,
        qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=12, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 0.8, "mscale_all_dim": 0.7})
    if version == 2:
        groups = dict(topk_method="group_limited_greedy", n_group=4, topk_group=2) if grouped else {}
        return DeepseekV2Config(**common, num_experts_per_tok=3, **(groups or dict(topk_method="greedy")))
    return DeepseekV3Config(**common, n_group=4, topk_group=2, num_experts_per_tok=4,
                            rope_interleave=rope_interleave)


def megatron_args(cfg) -> argparse.Namespace:
    """Megatron-LM's args for `cfg`. mcore scores a group by its top-(topk // group_topk) experts: V3's top-2
    sum and V2's max are the cases where that quotient is 2 and 1. V2's raw softmax weights are mcore's
    pre-softmax routing."""
    rope = cfg.rope_parameters
    if cfg.model_type == "deepseek_v3":
        assert cfg.num_experts_per_tok // cfg.topk_group == 2
        router = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group,
                      moe_router_pre_softmax=False)
    else:
        router = dict(moe_router_score_function="softmax", moe_router_pre_softmax=True)
        if cfg.topk_method == "group_limited_greedy":
            assert cfg.num_experts_per_tok // cfg.topk_group == 1
            router |= dict(moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group)
    return argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_attention_heads, kv_channels=None,
        max_position_embeddings=cfg.max_position_embeddings, padded_vocab_size=VOCAB, tensor_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, swiglu=True, openai_gelu=False,
        position_embedding_type="rope", rotary_base=rope["rope_theta"], untie_embeddings_and_output_weights=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True, params_dtype=torch.float32,
        multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_type="yarn", rotary_scaling_factor=rope["factor"], mscale=rope["mscale"],
        mscale_all_dim=rope["mscale_all_dim"], original_max_position_embeddings=rope["original_max_position_embeddings"],
        beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"],
        num_experts=cfg.n_routed_experts, moe_router_topk=cfg.num_experts_per_tok,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.n_shared_experts,
        moe_layer_freq=[0] * cfg.first_k_dense_replace + [1] * (cfg.num_hidden_layers - cfg.first_k_dense_replace),
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor, **router)


def mcore_key_map(cfg) -> dict[str, str]:
    """megatron-core name -> HF name; gate_proj/up_proj stack into one linear_fc1 (gate first)."""
    m = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
         "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
    attn = {"linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
            "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}
    attn |= ({"linear_q_down_proj": "q_a_proj", "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj"}
             if cfg.q_lora_rank else {"linear_q_proj": "q_proj"})
    for i in range(cfg.num_hidden_layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        m[mg + "input_layernorm.weight"] = hf + "input_layernorm.weight"
        m[mg + "pre_mlp_layernorm.weight"] = hf + "post_attention_layernorm.weight"
        m |= {f"{mg}self_attention.{a}.weight": f"{hf}self_attn.{b}.weight" for a, b in attn.items()}
        mlps = {"mlp.": "mlp."}
        if i >= cfg.first_k_dense_replace:
            m[mg + "mlp.router.weight"] = hf + "mlp.gate.weight"
            if cfg.model_type == "deepseek_v3":
                m[mg + "mlp.router.expert_bias"] = hf + "mlp.gate.e_score_correction_bias"
            mlps = {"mlp.shared_experts.": "mlp.shared_experts."}
        for a, b in mlps.items():
            m[mg + a + "linear_fc1.weight"] = (hf + b + "gate_proj.weight", hf + b + "up_proj.weight")
            m[mg + a + "linear_fc2.weight"] = hf + b + "down_proj.weight"
    return m


def hf_model(cfg):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape) if "norm" in name else 0.2 * torch.randn(p.shape))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape))
    return model


def to_mcore(hf: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """HF state -> megatron-core state by the key map; routed experts (HF packs them in 3-D tensors in
    transformers 5) go one per local_experts.{e}."""
    src = hf.state_dict()
    out = {}
    for mg, name in mcore_key_map(cfg).items():
        out[mg] = torch.cat([src[n] for n in name]) if isinstance(name, tuple) else src[name]
    if not getattr(cfg, "rope_interleave", True):
        interleave_rope_rows(out, cfg)
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        experts = f"model.layers.{i}.mlp.experts."
        gate_up, down = src[experts + "gate_up_proj"], src[experts + "down_proj"]
        for e in range(cfg.n_routed_experts):
            out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    return out


def interleave_rope_rows(state: dict[str, torch.Tensor], cfg) -> None:
    """mcore's MLA rope reads rope dims as interleaved pairs (x[0::2], x[1::2]); HF's rope_interleave=False
    stores the halves, so row j goes to 2j and row j + dr/2 to 2j + 1 in q's and kv_down's rope rows."""
    dr, heads = cfg.qk_rope_head_dim, cfg.num_attention_heads
    order = torch.arange(dr).view(2, dr // 2).t().reshape(-1)
    for name, tensor in state.items():
        if name.endswith(("linear_q_up_proj.weight", "linear_q_proj.weight")):
            per_head = tensor.view(heads, -1, tensor.shape[-1]).clone()
            per_head[:, -dr:] = per_head[:, -dr:][:, order]
            state[name] = per_head.view_as(tensor)
        elif name.endswith("linear_kv_down_proj.weight"):
            state[name] = torch.cat([tensor[:-dr], tensor[-dr:][order]])


def test_megatron_core_matches_v3_without_rope_interleave_once_rope_rows_interleave(mcore) -> None:
    check_against_transformers(hf_config(3, q_lora=True, rope_interleave=False))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("q_lora", [True, False])
def test_megatron_core_mla_moe_matches_transformers_deepseek(mcore, version: int, q_lora: bool) -> None:
    cfg = hf_config(version, q_lora)
    check_against_transformers(cfg)


def test_megatron_core_group_limited_greedy_matches_transformers_deepseek_v2(mcore) -> None:
    check_against_transformers(hf_config(2, q_lora=False, grouped=True))


def check_against_transformers(cfg) -> None:
    hf = hf_model(cfg)
    model = ref.build_model(megatron_args(cfg))
    state = to_mcore(hf, cfg)
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}, **state},
                          strict=True)
    with torch.no_grad():
        expected = hf(IDS).logits
    torch.testing.assert_close(ref.logits(model, IDS), expected, atol=1e-4, rtol=0)


# TP rules on the local spec: the down projections are column-parallel too (their outputs are all-gathered
# before the norms), unlike TE's spec, which keeps them whole; norms, router and expert bias stay whole.
TP_ROWS = ("word_embeddings", "output_layer", "linear_q_proj", "linear_q_down_proj", "linear_q_up_proj",
           "linear_kv_down_proj", "linear_kv_up_proj")
TP_COLUMNS = ("linear_proj", "linear_fc2")


def tp_shard(name: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    module = name.split(".")[-2]
    if module == "linear_fc1":    # gate and up split separately, each rank keeps [gate_r; up_r]
        return torch.cat([half.chunk(tp)[rank] for half in tensor.chunk(2)])
    if module in TP_ROWS:
        return tensor.chunk(tp)[rank]
    return tensor.chunk(tp, dim=1)[rank] if module in TP_COLUMNS else tensor


def tp_worker(rank: int, world: int, version: int, q_lora: bool, out: str, port: int) -> None:
    """One rank of a TP=world megatron-core run loading its shard of the HF weights; rank 0 saves logits."""
    ref.patch_for_cpu()
    ref.init_parallel(rank, world, world, port)
    cfg = hf_config(version, q_lora)
    args = megatron_args(cfg)
    args.tensor_model_parallel_size = world
    model = ref.build_model(args)
    state = {k: tp_shard(k, v, rank, world) for k, v in to_mcore(hf_model(cfg), cfg).items()}
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}, **state},
                          strict=True)
    result = ref.logits(model, IDS)
    if rank == 0:
        torch.save(result, out)
    ref.shutdown()


@pytest.mark.parametrize("version,q_lora", [(3, True), (2, False)])
def test_megatron_core_tp2_mla_shards_match_transformers(tmp_path, version: int, q_lora: bool) -> None:
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(tp_worker, args=(2, version, q_lora, str(out), ref.free_port()), nprocs=2, join=True)
    with torch.no_grad():
        expected = hf_model(hf_config(version, q_lora))(IDS).logits
    torch.testing.assert_close(torch.load(out), expected, atol=1e-4, rtol=0)
