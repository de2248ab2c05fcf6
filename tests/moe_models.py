"""Tiny random MoE checkpoints built offline with transformers, one per architecture rosetool reads.

Every parameter (norms included) is redrawn at random so that a swapped or stale tensor changes
numbers; the sizes are odd on purpose so that a dim mix-up cannot keep its shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON = dict(vocab_size=67, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)

# name -> (model_type, overrides): both values of norm_topk_prob, shared expert on and off, dense layers
# by mlp_only_layers and by decoder_sparse_step.
MOE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=20)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=10,
                                    intermediate_size=28, shared_expert_intermediate_size=14,
                                    norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                                    intermediate_size=18, head_dim=10, norm_topk_prob=True,
                                    decoder_sparse_step=2)),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=3, intermediate_size=14, norm_topk_prob=True)),
}


def build_moe_hf(name: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, case = MOE_CASES[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **case, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    model.eval().save_pretrained(folder)
    return folder
