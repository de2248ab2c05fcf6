"""Multi-head latent attention (DeepSeek-V2/V3), computed in the latent space so the KV cache holds the latent.

Every head's K and V are linear in one per-token latent c (kv_lora_rank dims, RMS-normed) plus a rotated
key part k_rot shared by all heads: k_h = [W_uk_h c; k_rot], v_h = W_uv_h c. So

    q_h . k_h = (W_uk_h^T q_nope_h) . c + q_rot_h . k_rot     and     sum_j p_j v_h,j = W_uv_h (sum_j p_j c_j),

which is multi-query attention with one shared K/V "head" [c; k_rot], queries [W_uk_h^T q_nope_h; q_rot_h]
and values c, followed by W_uv_h per head. The cache then stores kv_lora_rank + qk_rope_head_dim numbers per
token and layer instead of 2 * heads * head_dim: the reason MLA is worth serving. The attention function
gets K = [c; k_rot] and V = a view of its first kv_lora_rank dims, so eager and paged attention are the
plain grouped-query code with one K/V head.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..canonical import LATENT_NORM_EPS, ModelArgs
from .norms import RMSNorm
from .rope import apply_rope

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LatentAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        heads, rank = args.num_heads, args.kv_lora_rank
        self.nope = args.head_dim - args.qk_rope_head_dim
        if args.q_lora_rank is None:
            self.q = nn.Linear(args.hidden_size, heads * args.head_dim, bias=False)
        else:
            self.q_a = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.qkv_bias)
            self.q_a_norm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b = nn.Linear(args.q_lora_rank, heads * args.head_dim, bias=False)
        self.kv_a = nn.Linear(args.hidden_size, rank + args.qk_rope_head_dim, bias=args.qkv_bias)
        self.kv_a_norm = RMSNorm(rank, LATENT_NORM_EPS)
        self.kv_b = nn.Linear(rank, heads * (self.nope + args.v_head_dim), bias=False)
        self.o = nn.Linear(heads * args.v_head_dim, args.hidden_size, bias=args.o_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x) if self.args.q_lora_rank is None else self.q_b(self.q_a_norm(self.q_a(x)))
        return q.unflatten(-1, (self.args.num_heads, self.args.head_dim))

    def forward(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | Any,
                attn_fn: AttnFn) -> torch.Tensor:
        a = self.args
        rank = a.kv_lora_rank
        q_nope, q_rot = self._query(x).split([self.nope, a.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a(x).split([rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_norm(latent)
        q_rot = apply_rope(q_rot, *rope, a.rope_interleaved)
        k_rot = apply_rope(k_rot[..., None, :], *rope, a.rope_interleaved)
        w = self.kv_b.weight.view(a.num_heads, self.nope + a.v_head_dim, rank)
        w_k, w_v = w[:, :self.nope], w[:, self.nope:]
        query = torch.cat((torch.einsum("bthn,hnc->bthc", q_nope, w_k), q_rot), dim=-1)
        key = torch.cat((latent[..., None, :], k_rot), dim=-1)       # [B, T, 1, rank + rope]
        out = attn_fn(layer, query, key, key[..., :rank])             # [B, T, heads, rank]
        return self.o(torch.einsum("bthc,hvc->bthv", out, w_v).flatten(-2))
