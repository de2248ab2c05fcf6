"""What `inspect` says about the math a family adds beyond the Llama baseline (rotary layout, block shape).

Read from the canonical config alone, so the same lines appear for HF, native and Megatron folders.
"""

from __future__ import annotations

from typing import Any


def family_facts(cfg: dict[str, Any]) -> dict[str, str]:
    facts: dict[str, str] = {}
    if cfg.get("kv_lora_rank") is not None:
        facts.update(_latent_attention(cfg))
    elif cfg.get("position") == "rope":
        head_dim = cfg["head_dim"]
        rot = int(head_dim * cfg.get("partial_rotary_factor", 1.0))
        pairs = "interleaved pairs (GPT-J)" if cfg.get("rope_interleaved") else "rotate-half pairs"
        span = f"first {rot} of {head_dim} dims per head" if rot < head_dim else f"all {head_dim} dims"
        facts["rotary"] = f"rotary: {span}, {pairs}"
    if cfg.get("parallel_residual"):
        norms = "one shared norm" if cfg.get("shared_norm") else "separate norms"
        facts["block"] = f"parallel residual: x + attn(x) + mlp(x), {norms}"
    else:
        facts["block"] = "sequential residual: x += attn(norm(x)); x += mlp(norm(x))"
    if cfg.get("norm") == "gemma_rmsnorm":
        facts["norms"] = "RMSNorm scaled by (1 + weight), in fp32"
    if cfg.get("scale_embeddings"):
        facts["embeddings"] = "scaled by sqrt(hidden_size)"
    if cfg.get("sandwich_norms"):
        facts["block"] = "sequential residual with sandwich norms (after attention and MLP too)"
    if cfg.get("query_pre_attn_scalar"):
        facts["attention_scale"] = f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']} (scale = its -1/2 power)"
    for key, what in (("attn_softcap", "attention logits"), ("final_softcap", "final logits")):
        if cfg.get(key) is not None:
            facts[key] = f"{what} soft-capped at {cfg[key]}: cap * tanh(x / cap)"
    if cfg.get("layer_types") and cfg.get("sliding_window"):
        windowed = [str(i) for i, kind in enumerate(cfg["layer_types"]) if kind == "sliding_attention"]
        facts["sliding_window"] = f"layers {', '.join(windowed)} windowed ({cfg['sliding_window']}), others full"
    if cfg.get("qk_norm"):
        facts["qk_norm"] = "q/k norm per head before RoPE"
    if cfg.get("rope_local_theta") is not None:
        windowed = [str(i) for i, kind in enumerate(cfg.get("layer_types") or []) if kind == "sliding_attention"]
        facts["local_rope"] = (f"windowed layers {', '.join(windowed)}: RoPE base {cfg['rope_local_theta']}, unscaled; "
                               f"full layers: base {cfg['rope_theta']}")
    if cfg.get("lm_head_bias"):
        facts["lm_head"] = "LM head has a bias"
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "yarn":
        facts["yarn"] = (f"YaRN RoPE: factor {scaling['factor']} over {scaling['original_max_position_embeddings']} "
                         f"positions, cos/sin scaled by its attention factor")
    return facts


def _latent_attention(cfg: dict[str, Any]) -> dict[str, str]:
    """MLA: what is compressed, which dims rotate, and what one token costs in the KV cache."""
    heads, head_dim, rope, rank = cfg["num_heads"], cfg["head_dim"], cfg["qk_rope_head_dim"], cfg["kv_lora_rank"]
    v_dim = cfg.get("v_head_dim") or head_dim
    pairs = "interleaved pairs" if cfg.get("rope_interleaved") else "rotate-half pairs"
    q = f"q LoRA rank {cfg['q_lora_rank']}" if cfg.get("q_lora_rank") else "q projected directly"
    expanded = heads * (head_dim + v_dim)
    facts = {
        "latent_attention": f"multi-head latent attention: K/V of {heads} heads from a {rank}-dim latent per token; {q}",
        "rotary": f"rotary: last {rope} of {head_dim} q/k dims per head (key part shared by all heads), {pairs}",
        "kv_cache": f"KV cache per token and layer: latent {rank} + rotary {rope} = {rank + rope} values "
                    f"(expanded K/V would be {expanded}, {expanded / (rank + rope):.1f}x more)",
    }
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("mscale_all_dim"):
        facts["attention_scale"] = (f"softmax scale (qk head dim {head_dim})^-1/2 times YaRN mscale^2 "
                                    f"(mscale_all_dim {scaling['mscale_all_dim']})")
    return facts
