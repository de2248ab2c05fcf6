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
    if cfg.get("lm_head_bias"):
        facts["lm_head"] = "LM head has a bias"
    return facts
