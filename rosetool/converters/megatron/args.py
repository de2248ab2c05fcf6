"""Megatron's `args` Namespace <-> rosetool's canonical config.

Written checkpoints also carry `rosetool_config` (the full canonical config, HF vocabulary size
included) so a round trip restores what Megatron's own fields cannot say; foreign checkpoints are
read from the standard fields.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointError, RosetoolError
from ...canonical import LATENT_NORM_EPS
from ...mappings import expr
from ...mappings.spec import ArchSpec, get_spec
from .layout import Layout
from .lm_defaults import megatron_lm_defaults

CHECKPOINT_VERSION = 3.0
# Megatron-LM's --use-rope-scaling is Llama-3.1 scaling with these constants; only the factor is an arg.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def spec_for_args(args: Any, where: str) -> ArchSpec:
    saved = getattr(args, "rosetool_architecture", None)
    if saved:
        return get_spec(saved)
    if getattr(args, "multi_latent_attention", False):
        sigmoid = getattr(args, "moe_router_score_function", "softmax") == "sigmoid"
        return get_spec("deepseek_v3" if sigmoid else "deepseek_v2")
    if getattr(args, "num_experts", None):
        if getattr(args, "qk_layernorm", False):
            return get_spec("qwen3_moe")
        return get_spec("qwen2_moe" if getattr(args, "moe_shared_expert_intermediate_size", None) else "mixtral")
    if getattr(args, "swiglu", False):
        if getattr(args, "qk_layernorm", False):
            return get_spec("qwen3")
        if getattr(args, "rotary_interleaved", False):     # GLM's pairing of dims (2i, 2i+1)
            return get_spec("glm")
        if getattr(args, "rotary_percent", 1.0) < 1.0:     # Phi-4-mini's partial rotate-half rotary
            return get_spec("phi3")
        qkv_bias_only = getattr(args, "add_qkv_bias", False) and not getattr(args, "add_bias_linear", True)
        return get_spec("qwen2" if qkv_bias_only else "llama")
    if getattr(args, "position_embedding_type", "learned_absolute") == "rope":
        if getattr(args, "group_query_attention", False) and args.num_query_groups != args.num_attention_heads:
            raise CheckpointError(f"{where}: a GELU model with rotary positions and grouped-query attention "
                                  f"matches no supported architecture (GPT-NeoX has one K/V head per query head)")
        return get_spec("gpt_neox")     # LayerNorm + GELU + rotary: sequential GPT-NeoX
    if getattr(args, "position_embedding_type", "learned_absolute") != "learned_absolute":
        raise CheckpointError(f"{where}: non-SwiGLU model with {args.position_embedding_type} positions "
                              f"matches no supported architecture (GPT-2, GPT-NeoX or the Llama family)")
    return get_spec("gpt2")


def config_from_args(args: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """Canonical config fields (unresolved; the spec fills its defaults)."""
    saved = dict(getattr(args, "rosetool_config", None) or {})
    if saved:
        return {**saved, **({"vocab_size": vocab_size} if vocab_size else {})}
    if getattr(args, "window_size", None):
        raise RosetoolError(f"unsupported Megatron arg window_size={args.window_size!r} (sliding windows are not read)")
    heads = args.num_attention_heads
    rms = getattr(args, "normalization", "LayerNorm") == "RMSNorm"
    bias = getattr(args, "add_bias_linear", True)
    swiglu = getattr(args, "swiglu", False)
    rope = getattr(args, "position_embedding_type", "learned_absolute") == "rope"
    return {
        # Megatron-LM's --vocab-size (and Bridge's and NeMo's vocab_size) is the unpadded one
        "vocab_size": vocab_size or getattr(args, "vocab_size", None) or getattr(args, "padded_vocab_size", None),
        "hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": heads,
        "num_kv_heads": args.num_query_groups if getattr(args, "group_query_attention", False) else heads,
        "head_dim": getattr(args, "kv_channels", None) or args.hidden_size // heads,
        "intermediate_size": getattr(args, "ffn_hidden_size", None) or 4 * args.hidden_size,
        "max_position_embeddings": getattr(args, "max_position_embeddings", None),
        "norm": "rmsnorm" if rms else "layernorm", "norm_bias": not rms,
        "norm_eps": getattr(args, "layernorm_epsilon", 1e-5),
        "activation": "silu" if swiglu else "gelu_tanh" if getattr(args, "openai_gelu", False) else "gelu",
        "glu": swiglu, "position": "rope" if rope else "learned",
        "rope_theta": float(getattr(args, "rotary_base", 10000)) if rope else None,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": float(getattr(args, "rope_scaling_factor", 8.0))}
        if getattr(args, "use_rope_scaling", False) else None,
        "qkv_bias": bias or getattr(args, "add_qkv_bias", False), "o_bias": bias, "mlp_bias": bias,
        "qk_norm": getattr(args, "qk_layernorm", False),
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        # fields only some specs have (the spec drops the rest); megatron-core's block is always sequential
        "partial_rotary_factor": float(getattr(args, "rotary_percent", 1.0)),
        "rope_interleaved": bool(getattr(args, "rotary_interleaved", False)), "parallel_residual": False,
        **_moe_config(args),
        **_mla_config(args),
    }


def _mla_config(args: Any) -> dict[str, Any]:
    """megatron-core's latent attention args -> canonical fields (its q/kv layernorms are the latent norms)."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    rope = getattr(args, "qk_pos_emb_head_dim", 64)
    yarn = getattr(args, "rope_type", "rope") == "yarn"
    scaling = {"rope_type": "yarn", "factor": float(args.rotary_scaling_factor), "mscale": float(args.mscale),
               "mscale_all_dim": float(args.mscale_all_dim), "beta_fast": float(args.beta_fast),
               "beta_slow": float(args.beta_slow),
               "original_max_position_embeddings": int(args.original_max_position_embeddings)} if yarn else None
    return {"kv_lora_rank": args.kv_lora_rank, "q_lora_rank": getattr(args, "q_lora_rank", None),
            "head_dim": args.qk_head_dim + rope, "qk_rope_head_dim": rope, "v_head_dim": args.v_head_dim,
            "rope_scaling": scaling, "qk_norm": False, "rope_interleaved": True}


# megatron-core scores an expert group by the sum of its best (top-k // group top-k) experts: the canonical
# group scores it can express, and that count for each
_GROUP_SCORE_TOP = {"max": 1, "top2_sum": 2}


def _moe_config(args: Any) -> dict[str, Any]:
    """Megatron-LM's MoE args -> canonical fields. Routing Megatron does and the runtime does not
    (sigmoid scores, scaled or grouped top-k) is refused by name."""
    experts = getattr(args, "num_experts", None) or 0
    if not experts:
        return {}
    scoring = getattr(args, "moe_router_score_function", None) or "softmax"
    if scoring not in ("softmax", "sigmoid"):
        raise RosetoolError(f"unsupported Megatron arg moe_router_score_function={scoring!r} (not implemented)")
    groups, group_topk = getattr(args, "moe_router_num_groups", None) or 1, getattr(args, "moe_router_group_topk", None) or 1
    per_group = args.moe_router_topk // group_topk
    scores = {top: score for score, top in _GROUP_SCORE_TOP.items()}
    if groups > 1 and per_group not in scores:
        raise RosetoolError(f"Megatron scores expert groups by their best {per_group} experts summed "
                            f"(moe_router_topk // moe_router_group_topk); the runtime implements {sorted(scores)}")
    shared = getattr(args, "moe_shared_expert_intermediate_size", None) or 0
    return {"num_experts": experts, "num_experts_per_tok": args.moe_router_topk,
            "router_scoring": scoring, "router_bias": bool(getattr(args, "moe_router_enable_expert_bias", False)),
            "expert_groups": groups, "topk_groups": group_topk if groups > 1 else 1,
            "group_score": scores[per_group] if groups > 1 else "max",
            "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
            "moe_intermediate_size": getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size,
            "shared_expert_intermediate_size": shared,
            "shared_expert_gate": bool(shared and getattr(args, "moe_shared_expert_gate", False)),
            # softmax over all experts then top-k keeps raw probabilities; top-k then softmax renormalises;
            # megatron-core's sigmoid scores are renormalised whenever more than one expert is chosen
            "norm_topk_prob": args.moe_router_topk > 1 if scoring == "sigmoid"
            else not getattr(args, "moe_router_pre_softmax", False),
            "mlp_only_layers": _dense_layers(getattr(args, "moe_layer_freq", 1), args.num_layers)}


def _dense_layers(freq: int | list[int] | str, num_layers: int) -> list[int]:
    """moe_layer_freq: every N-th layer is MoE (N int), or a 0/1 per layer (a list, or its string form)."""
    if isinstance(freq, str):    # Megatron-LM evals pattern strings like "([1]*3+[0])*2"; rosetool runs no code
        if not re.fullmatch(r"\s*\[?[\d,\s]*\]?\s*", freq):
            raise RosetoolError(f"moe_layer_freq={freq!r}: give it as an int or a list of 0/1 per layer")
        freq = [int(x) for x in freq.strip(" []").split(",") if x.strip()] if "," in freq or "[" in freq else int(freq)
    if isinstance(freq, int):
        return [i for i in range(num_layers) if i % freq]
    if len(freq) != num_layers:
        raise RosetoolError(f"moe_layer_freq lists {len(freq)} layers for a {num_layers}-layer model")
    return [i for i, moe in enumerate(freq) if not moe]


def _moe_args(cfg: Mapping[str, Any], layout: Layout, te: bool) -> dict[str, Any]:
    if not cfg.get("num_experts"):
        return {}
    if cfg.get("qk_norm_full_width"):
        raise RosetoolError("qk_norm_full_width (OLMoE's q/k norm over all heads) has no Megatron-LM equivalent")
    dense = set(cfg["mlp_only_layers"])
    return dict(**_router_args(cfg), num_experts=cfg["num_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"] or None,
                moe_shared_expert_gate=bool(cfg["shared_expert_gate"]),
                moe_layer_freq=[int(i not in dense) for i in range(cfg["num_layers"])] if dense else 1,
                expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.tp,
                moe_grouped_gemm=te, moe_token_dispatcher_type="alltoall")


def _router_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek's routing as megatron-core's router options, or a refusal naming what it cannot express."""
    k, groups, sigmoid = cfg["num_experts_per_tok"], cfg.get("expert_groups", 1), cfg.get("router_scoring") == "sigmoid"
    if sigmoid and k > 1 and not cfg["norm_topk_prob"]:
        raise RosetoolError("norm_topk_prob=false with sigmoid routing: megatron-core always renormalises "
                            "the chosen sigmoid scores")
    out = dict(moe_router_score_function=cfg.get("router_scoring", "softmax"),
               moe_router_pre_softmax=not sigmoid and not cfg["norm_topk_prob"],
               moe_router_enable_expert_bias=bool(cfg.get("router_bias")),
               moe_router_topk_scaling_factor=cfg.get("routed_scaling_factor", 1.0)
               if cfg.get("routed_scaling_factor", 1.0) != 1.0 else None)
    if groups > 1:
        per_group = _GROUP_SCORE_TOP[cfg["group_score"]]
        if k // cfg["topk_groups"] != per_group:
            raise RosetoolError(f"megatron-core scores an expert group by its best num_experts_per_tok // "
                                f"topk_group = {k // cfg['topk_groups']} experts summed; this model's groups "
                                f"score by their best {per_group}")
        out |= dict(moe_router_num_groups=groups, moe_router_group_topk=cfg["topk_groups"])
    return out


def _mla_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """megatron-core's MLATransformerConfig fields, or a refusal naming what its MLA cannot express."""
    if cfg.get("kv_lora_rank") is None:
        return {}
    if cfg["qkv_bias"] or cfg["o_bias"]:
        raise RosetoolError("attention_bias=true: megatron-core builds latent attention's projections without biases")
    if cfg["norm_eps"] != LATENT_NORM_EPS:
        raise RosetoolError(f"rms_norm_eps={cfg['norm_eps']}: megatron-core applies it to the q/kv latent norms "
                            f"too, which DeepSeek fixes at {LATENT_NORM_EPS}")
    scaling = cfg.get("rope_scaling") or {}
    # Megatron-LM's YaRN args exist whether or not rope_type uses them; its defaults where there is no YaRN
    yarn = {"rope_type": "yarn" if scaling else "rope", "rotary_scaling_factor": scaling.get("factor", 1.0),
            "mscale": scaling.get("mscale", 1.0), "mscale_all_dim": scaling.get("mscale_all_dim", 0.0),
            "beta_fast": scaling.get("beta_fast", 32), "beta_slow": scaling.get("beta_slow", 1),
            "original_max_position_embeddings": scaling.get("original_max_position_embeddings",
                                                            cfg["max_position_embeddings"])}
    if scaling and (scaling.get("rope_type") != "yarn" or scaling.get("attention_factor") is not None
                    or scaling.get("truncate", True) is not True):
        raise RosetoolError(f"rope_scaling {dict(scaling)} has no megatron-core MLA equivalent (YaRN with factor, "
                            f"mscale, mscale_all_dim, beta_fast/slow and original_max_position_embeddings only)")
    return dict(multi_latent_attention=True, q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
                qk_head_dim=cfg["head_dim"] - cfg["qk_rope_head_dim"], qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
                v_head_dim=cfg["v_head_dim"], qk_layernorm=True, use_rope_scaling=False, **yarn)


def make_args(spec: ArchSpec, cfg: Mapping[str, Any], layout: Layout, padded_vocab: int, divisible_by: int,
              dtype: torch.dtype, ckpt_format: str, legacy: bool = False, te: bool = False,
              where: object = "") -> argparse.Namespace:
    """Every field Megatron-LM's parse_args defines (its defaults), the model's values set, plus rosetool's
    own. What Megatron cannot express is refused here, before a file is written, naming the source (`where`)."""
    rope = cfg["position"] == "rope"
    try:
        mla, moe = _mla_args(cfg), _moe_args(cfg, layout, te)   # their specific reasons before the general ones
        refuse_inexpressible(cfg)
    except RosetoolError as exc:
        raise RosetoolError(f"{where}: {spec.architecture or spec.name} ({spec.name}) cannot be written for "
                            f"Megatron: {exc}") from None
    model = dict(
        **({} if mla else _rope_scaling_args(cfg.get("rope_scaling"))),
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_heads"], num_query_groups=cfg["num_kv_heads"],
        group_query_attention=cfg["num_kv_heads"] != cfg["num_heads"], kv_channels=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"], seq_length=cfg["max_position_embeddings"],
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        normalization="RMSNorm" if cfg["norm"] == "rmsnorm" else "LayerNorm", layernorm_epsilon=cfg["norm_eps"],
        swiglu=bool(cfg["glu"]), openai_gelu=cfg["activation"] == "gelu_tanh",
        position_embedding_type="rope" if rope else "learned_absolute", use_rotary_position_embeddings=rope,
        add_position_embedding=not rope, rotary_base=int(cfg["rope_theta"] or 10000),
        rotary_percent=float(cfg.get("partial_rotary_factor", 1.0)),
        rotary_interleaved=bool(cfg.get("rope_interleaved")) and not mla,   # MLA pairs its rope dims itself
        untie_embeddings_and_output_weights=not cfg["tie_word_embeddings"],
        add_bias_linear=bool(cfg["o_bias"] and cfg["mlp_bias"]), add_qkv_bias=bool(cfg["qkv_bias"]),
        qk_layernorm=bool(cfg["qk_norm"]) or bool(mla), params_dtype=dtype, fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16, ckpt_format=ckpt_format, use_legacy_models=legacy,
        transformer_impl="transformer_engine" if te else "local", checkpoint_version=CHECKPOINT_VERSION,
        **moe, **{k: v for k, v in mla.items() if k != "qk_layernorm"},
        rosetool_architecture=spec.name, rosetool_config=dict(cfg))
    return argparse.Namespace(**{**megatron_lm_defaults(), **model})


def refuse_inexpressible(cfg: Mapping[str, Any]) -> None:
    """Refuse, by name, what megatron-core 0.16.1's GPTModel would build differently from the canonical model,
    before anything is written: a checkpoint it loads strictly but runs with other math is worse than none."""
    window = cfg.get("sliding_window")
    problems = {
        # TransformerLayer is input_layernorm -> attention -> add -> pre_mlp_layernorm -> MLP -> add, nothing else
        "parallel_residual": "megatron-core's TransformerLayer has no parallel attention + MLP block",
        # add_bias_linear biases linear_qkv, linear_proj, fc1 and fc2 together; add_qkv_bias adds QKV alone
        "o_bias != mlp_bias": "megatron-core's add_bias_linear biases attention output and MLP together",
        "o_bias and not qkv_bias": "megatron-core's add_bias_linear also biases linear_qkv",
        "glu and activation != 'silu'": "Megatron-LM's gated MLP is SwiGLU only (--swiglu)",
        "not glu and activation != 'gelu' and activation != 'gelu_tanh'": "Megatron-LM's plain MLP is GELU (exact, or --openai-gelu)",
    }
    for when, why in problems.items():
        env = {k: cfg.get(k) for k in expr.names(when)}
        if expr.evaluate(when, env):
            detail = ", ".join(f"{k}={env[k]!r}" for k in sorted(env))
            raise RosetoolError(f"unsupported config {detail}: {why}")
    # the local spec's attention applies window_size only in its unfused softmax: the fused causal kernel
    # (fp16/bf16 with masked_softmax_fusion, Megatron-LM's default) ignores it. A window no sequence can
    # exceed changes nothing, so it is kept (in rosetool_config) rather than refused.
    if window is not None and window < cfg["max_position_embeddings"]:
        raise RosetoolError(f"unsupported config sliding_window={window}: megatron-core's local attention "
                            f"drops window_size in its fused causal softmax, so the window would be silently lost")


def _rope_scaling_args(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    if not scaling:
        return {"use_rope_scaling": False}
    if {k: v for k, v in scaling.items() if k != "factor"} != _LLAMA3_ROPE:
        raise RosetoolError(f"rope_scaling {dict(scaling)} has no Megatron-LM equivalent (only Llama-3.1 "
                            f"scaling with its standard constants: --use-rope-scaling)")
    return {"use_rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}


def summary(args: Any) -> dict[str, Any]:
    """The args fields `inspect` shows."""
    always = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "normalization",
              "swiglu", "position_embedding_type", "untie_embeddings_and_output_weights", "params_dtype")
    if_present = ("rotary_percent", "rotary_interleaved", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                  "moe_shared_expert_intermediate_size", "moe_layer_freq", "expert_model_parallel_size",
                  "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_num_groups",
                  "moe_router_group_topk", "moe_router_topk_scaling_factor", "multi_latent_attention", "q_lora_rank",
                  "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type")
    return {n: str(getattr(args, n)) if isinstance(getattr(args, n, None), torch.dtype) else getattr(args, n, None)
            for n in always + tuple(n for n in if_present if hasattr(args, n))}
