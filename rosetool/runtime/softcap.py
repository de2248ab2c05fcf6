"""Scaled dot-product attention with optional logit soft-capping (Gemma 2), for eager and paged paths.

SDPA has no soft-cap, so capped layers take an explicit softmax; uncapped ones keep SDPA's fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, H, Tk, D], boolean mask broadcastable to [B, H, Tq, Tk] (True = attend)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs.to(v.dtype) @ v)
