"""Megatron's `args` Namespace <-> rosetool's canonical config.

Written checkpoints also carry `rosetool_config` (the full canonical config, HF vocabulary size
included) so a round trip restores what Megatron's own fields cannot say; foreign checkpoints are
read from the standard fields.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from ...errors import CheckpointError, RosetoolError
from ...mappings.spec import ArchSpec, get_spec
from .layout import Layout

CHECKPOINT_VERSION = 3.0
# Megatron-LM's --use-rope-scaling is Llama-3.1 scaling with these constants; only the factor is an arg.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def spec_for_args(args: Any, where: str) -> ArchSpec:
    saved = getattr(args, "rosetool_architecture", None)
    if saved:
        return get_spec(saved)
    if getattr(args, "swiglu", False):
        if getattr(args, "qk_layernorm", False):
            return get_spec("qwen3")
        qkv_bias_only = getattr(args, "add_qkv_bias", False) and not getattr(args, "add_bias_linear", True)
        return get_spec("qwen2" if qkv_bias_only else "llama")
    if getattr(args, "position_embedding_type", "learned_absolute") != "learned_absolute":
        raise CheckpointError(f"{where}: non-SwiGLU model with {args.position_embedding_type} positions "
                              f"matches no supported architecture (GPT-2 or the Llama family)")
    return get_spec("gpt2")


def config_from_args(args: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """Canonical config fields (unresolved; the spec fills its defaults)."""
    saved = dict(getattr(args, "rosetool_config", None) or {})
    if saved:
        return {**saved, **({"vocab_size": vocab_size} if vocab_size else {})}
    heads = args.num_attention_heads
    rms = getattr(args, "normalization", "LayerNorm") == "RMSNorm"
    bias = getattr(args, "add_bias_linear", True)
    swiglu = getattr(args, "swiglu", False)
    rope = getattr(args, "position_embedding_type", "learned_absolute") == "rope"
    return {
        "vocab_size": vocab_size or getattr(args, "padded_vocab_size", None),
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
    }


def make_args(spec: ArchSpec, cfg: Mapping[str, Any], layout: Layout, padded_vocab: int, divisible_by: int,
              dtype: torch.dtype, ckpt_format: str, legacy: bool = False, te: bool = False) -> argparse.Namespace:
    """The fields Megatron-LM reads back with --use-checkpoint-args, plus rosetool's own."""
    rope = cfg["position"] == "rope"
    return argparse.Namespace(
        **_rope_scaling_args(cfg.get("rope_scaling")),
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_heads"], num_query_groups=cfg["num_kv_heads"],
        group_query_attention=cfg["num_kv_heads"] != cfg["num_heads"], kv_channels=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"], seq_length=cfg["max_position_embeddings"],
        padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        normalization="RMSNorm" if cfg["norm"] == "rmsnorm" else "LayerNorm", layernorm_epsilon=cfg["norm_eps"],
        swiglu=bool(cfg["glu"]), openai_gelu=cfg["activation"] == "gelu_tanh",
        position_embedding_type="rope" if rope else "learned_absolute", use_rotary_position_embeddings=rope,
        add_position_embedding=not rope, rotary_base=int(cfg["rope_theta"] or 10000), rotary_percent=1.0,
        untie_embeddings_and_output_weights=not cfg["tie_word_embeddings"],
        add_bias_linear=bool(cfg["o_bias"] and cfg["mlp_bias"]), add_qkv_bias=bool(cfg["qkv_bias"]),
        qk_layernorm=bool(cfg["qk_norm"]), params_dtype=dtype, fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16, ckpt_format=ckpt_format, use_legacy_models=legacy,
        transformer_impl="transformer_engine" if te else "local", checkpoint_version=CHECKPOINT_VERSION,
        rosetool_architecture=spec.name, rosetool_config=dict(cfg))


def _rope_scaling_args(scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    if not scaling:
        return {"use_rope_scaling": False}
    if {k: v for k, v in scaling.items() if k != "factor"} != _LLAMA3_ROPE:
        raise RosetoolError(f"rope_scaling {dict(scaling)} has no Megatron-LM equivalent (only Llama-3.1 "
                            f"scaling with its standard constants: --use-rope-scaling)")
    return {"use_rope_scaling": True, "rope_scaling_factor": float(scaling["factor"])}


def summary(args: Any) -> dict[str, Any]:
    """The args fields `inspect` shows."""
    names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "normalization",
             "swiglu", "position_embedding_type", "untie_embeddings_and_output_weights", "params_dtype")
    return {n: str(getattr(args, n)) if isinstance(getattr(args, n, None), torch.dtype) else getattr(args, n, None)
            for n in names}
