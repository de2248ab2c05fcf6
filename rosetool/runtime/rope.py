"""Rotary position embeddings: frequencies (plain, linear, Llama 3 scaling) and the two pair layouts.

Families differ in which dims a rotation pairs up: HF Llama/NeoX/Phi rotate the first half of the
rotated dims against the second ("rotate-half"), GPT-J rotates neighbours (2i, 2i+1). Several rotate
only the first int(head_dim * partial_rotary_factor) dims of each head and pass the rest through (partial rotary).
"""

from __future__ import annotations

import math

import torch

from ..canonical import ModelArgs


def rotary_dim(args: ModelArgs) -> int:
    return int(args.head_dim * args.partial_rotary_factor)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's wavelength-dependent scaling or plain linear scaling."""
    d = rotary_dim(args)
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling or {}
    if s.get("rope_type") == "linear":
        return inv / s["factor"]
    if s.get("rope_type") == "llama3":
        old = s["original_max_position_embeddings"]
        low_wl, high_wl = old / s["low_freq_factor"], old / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / s["factor"], inv)
        smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        mid = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin laid out like the dims they rotate: [f0 f1 .. f0 f1 ..] or [f0 f0 f1 f1 ..]; shape [..., T, 1, rot]."""
    freqs = positions[..., None].float() * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    emb = emb[..., None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [..., T, heads, D]; the rest pass through unchanged."""
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    if interleaved:
        turned = torch.stack((-head[..., 1::2], head[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, dim=-1)
        turned = torch.cat((-x2, x1), dim=-1)
    out = head * cos + turned * sin
    return torch.cat((out, tail), dim=-1) if tail.shape[-1] else out
