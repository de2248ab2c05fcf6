"""Scaled dot-product attention with optional logit soft-capping (Gemma 2), for eager and paged paths.

SDPA has no soft-cap, so capped layers take an explicit softmax; uncapped ones keep SDPA's fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, KV, Tk, D] with H a multiple of KV (grouped-query heads share K/V), boolean mask
    broadcastable to [B, H, Tq, Tk] (True = attend), or None with `is_causal` (or for no mask at all)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v
