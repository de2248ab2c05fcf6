"""What `inspect` says about the math a family adds beyond the Llama baseline (rotary layout, block shape).

Read from the canonical config alone, so the same lines appear for HF, native and Megatron folders.
"""

from __future__ import annotations

from typing import Any


def family_facts(cfg: dict[str, Any]) -> dict[str, str]:
    facts: dict[str, str] = {}
    if cfg.get("position") == "rope":
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
    return facts
