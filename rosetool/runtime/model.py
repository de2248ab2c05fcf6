"""The runtime's transformer: one file, GPT-2 and the Llama family (MoE layers from moe.py), native weight layout.

`ModelArgs` (rosetool.canonical) is the canonical config of the mapping specs, so a native folder's
config loads as is.
Attention is pluggable (`attn_fn`): the eager path here is the reference that conversion parity is
checked with; the paged engine passes its own function and a flattened batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..canonical import ModelArgs
from .moe import MoE

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu, "relu": F.relu,
}


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's wavelength-dependent scaling or plain linear scaling."""
    d = args.head_dim
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF and Megatron convention); x [..., T, heads, D], cos/sin [..., T, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    dim = dim or args.hidden_size
    if args.norm == "rmsnorm":
        return RMSNorm(dim, args.norm_eps)
    return nn.LayerNorm(dim, eps=args.norm_eps, bias=args.norm_bias)


def eager_attention(args: ModelArgs) -> AttnFn:
    """Causal attention over each row of a [B, T] batch (positions 0..T-1), with an optional window."""
    def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, heads, T, D]
        groups = args.num_heads // args.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        mask = i[None, :] <= i[:, None]
        if args.sliding_window:
            mask &= i[:, None] - i[None, :] < args.sliding_window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    return attn


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv = nn.Linear(args.hidden_size, q + 2 * kv, bias=args.qkv_bias)
        self.o = nn.Linear(q, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(q if args.qk_norm_full_width else args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(kv if args.qk_norm_full_width else args.head_dim, args.norm_eps)

    def forward(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_fn: AttnFn) -> torch.Tensor:
        a = self.args
        q, k, v = self.qkv(x).split([a.num_heads * a.head_dim] + [a.num_kv_heads * a.head_dim] * 2, dim=-1)
        if a.qk_norm_full_width:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.unflatten(-1, (a.num_heads, a.head_dim))
        k = k.unflatten(-1, (a.num_kv_heads, a.head_dim))
        v = v.unflatten(-1, (a.num_kv_heads, a.head_dim))
        if a.qk_norm and not a.qk_norm_full_width:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o(attn_fn(layer, q, k, v).flatten(-2))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, ffn: int | None = None):
        super().__init__()
        self.glu = args.glu
        self.act = _ACTIVATIONS[args.activation]
        ffn = ffn or args.intermediate_size    # an MoE layer's shared expert has its own width
        self.up = nn.Linear(args.hidden_size, ffn * (2 if args.glu else 1), bias=args.mlp_bias)
        self.down = nn.Linear(ffn, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(args), Attention(args)
        self.mlp_norm = make_norm(args)
        self.mlp = self.moe = None     # one of them: native keys say `mlp` or `moe` by layer kind
        if args.is_moe_layer(layer):
            shared = MLP(args, args.shared_expert_intermediate_size) if args.shared_expert_intermediate_size else None
            self.moe = MoE(args, _ACTIVATIONS[args.activation], shared)
        else:
            self.mlp = MLP(args)

    def forward(self, layer: int, x: torch.Tensor, rope: Any, attn_fn: AttnFn) -> torch.Tensor:
        x = x + self.attn(layer, self.attn_norm(x), rope, attn_fn)
        return x + (self.mlp if self.moe is None else self.moe)(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        if args.position == "learned":
            self.pos_embed = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = make_norm(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._eager = eager_attention(args)
        self._inv_freq: torch.Tensor | None = None   # cached per device: no host copy inside a CUDA graph

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.args).to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       attn_fn: AttnFn | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.embed(input_ids)
        rope = None
        if self.args.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            rope = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, rope, attn_fn or self._eager)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.args.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn_fn: AttnFn | None = None) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids, positions, attn_fn))


def load_model(path_or_id: Any, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Any checkpoint -> (Transformer, LoadedInfo); see `loader.py` (kept apart to spare this file I/O)."""
    from .loader import load_model as _load
    return _load(path_or_id, dtype, device)
