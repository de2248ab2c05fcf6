"""Rotary position embeddings: frequencies (plain, linear, Llama 3, YaRN scaling) and the two pair layouts.

Families differ in which dims a rotation pairs up: HF Llama/NeoX/Phi rotate the first half of the
rotated dims against the second ("rotate-half"), GPT-J rotates neighbours (2i, 2i+1). Several rotate
only the first int(head_dim * partial_rotary_factor) dims of each head and pass the rest through (partial rotary).
"""

from __future__ import annotations

import math

import torch

from ..canonical import ModelArgs, yarn_mscale


def rotary_dim(args: ModelArgs) -> int:
    """Latent attention rotates its own qk_rope_head_dim dims; others the first fraction of each head."""
    return args.qk_rope_head_dim if args.is_mla else int(args.head_dim * args.partial_rotary_factor)


def rope_attention_factor(args: ModelArgs) -> float:
    """YaRN scales cos and sin (so q.k by its square): mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
    s = args.rope_scaling or {}
    if s.get("rope_type") != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return yarn_mscale(s["factor"], s["mscale"]) / yarn_mscale(s["factor"], s["mscale_all_dim"])
    return yarn_mscale(s["factor"])


def _yarn(d: int, theta: float, s: dict) -> torch.Tensor:
    """Interpolate slow-turning dims by `factor`, keep fast ones, and ramp linearly between the dims that
    turn beta_slow and beta_fast times over the original context (HF's `_compute_yarn_parameters`)."""
    def dim_of(turns: float) -> float:
        return d * math.log(s["original_max_position_embeddings"] / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    pos = theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    return 1.0 / (s["factor"] * pos) * (1 - keep) + 1.0 / pos * keep


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's wavelength-dependent scaling or plain linear scaling."""
    d = rotary_dim(args)
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling or {}
    if s.get("rope_type") == "linear":
        return inv / s["factor"]
    if s.get("rope_type") == "yarn":
        return _yarn(d, args.rope_theta, s)
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
                 dtype: torch.dtype, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin laid out like the dims they rotate: [f0 f1 .. f0 f1 ..] or [f0 f0 f1 f1 ..]; shape [..., T, 1, rot]."""
    freqs = positions[..., None].float() * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    emb = emb[..., None, :]
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


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
