"""The runtime's transformer for every family (GPT-2, Llama, GPT-NeoX, GPT-J, Phi, Gemma, GLM, DeepSeek), native layout.

Families differ in small, named ways, each kept beside this file: RoPE layouts (`rope.py`), norms
(`norms.py`), soft-capped attention (`softcap.py`), latent attention (`mla.py`), mixture-of-experts
layers (`moe.py`); block shape (sequential, parallel, sandwich) is `Block`.

`ModelArgs` (rosetool.canonical) is the canonical config of the mapping specs, so a native folder's
config loads as is.
Attention is pluggable (`attn_fn`): the eager path here is the reference that conversion parity is
checked with; the paged engine passes its own function and a flattened batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..canonical import ModelArgs
from .mla import LatentAttention
from .moe import MoE
from .norms import make_norm
from .rope import apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq
from .softcap import attend

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu, "relu": F.relu,
}


def eager_attention(args: ModelArgs) -> AttnFn:
    """Causal attention over each row of a [B, T] batch (positions 0..T-1), with each layer's window."""
    def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, heads, T, D]; K/V shared by groups
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        mask = i[None, :] <= i[:, None]
        window = args.layer_window(layer)
        if window:
            mask &= i[:, None] - i[None, :] < window
        return attend(q, k, v, mask, args.attn_scale, args.attn_softcap).transpose(1, 2)
    return attn


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv = nn.Linear(args.hidden_size, q + 2 * kv, bias=args.qkv_bias)
        self.o = nn.Linear(q, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = make_norm(args, q if args.qk_norm_full_width else args.head_dim)
            self.k_norm = make_norm(args, kv if args.qk_norm_full_width else args.head_dim)

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
            q, k = apply_rope(q, *rope, a.rope_interleaved), apply_rope(k, *rope, a.rope_interleaved)
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
    """Sequential (x += attn; x += mlp), parallel (both branches read the same x; GPT-J, NeoX, Phi-2) or
    sequential with sandwich norms (each branch's output normed before it joins the residual; Gemma 2)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.parallel, self.shared_norm, self.sandwich = args.parallel_residual, args.shared_norm, args.sandwich_norms
        self.attn_norm = make_norm(args)
        self.attn = LatentAttention(args) if args.is_mla else Attention(args)
        self.mlp = self.moe = None     # one of them: native keys say `mlp` or `moe` by layer kind
        if args.is_moe_layer(layer):
            shared = MLP(args, args.shared_expert_intermediate_size) if args.shared_expert_intermediate_size else None
            self.moe = MoE(args, _ACTIVATIONS[args.activation], shared)
        else:
            self.mlp = MLP(args)
        if not args.shared_norm:
            self.mlp_norm = make_norm(args)
        if args.sandwich_norms:
            self.post_attn_norm, self.post_mlp_norm = make_norm(args), make_norm(args)

    def forward(self, layer: int, x: torch.Tensor, rope: Any, attn_fn: AttnFn) -> torch.Tensor:
        ffn = self.mlp if self.moe is None else self.moe
        h = self.attn_norm(x)
        attn = self.attn(layer, h, rope, attn_fn)
        if self.parallel:
            return x + attn + ffn(h if self.shared_norm else self.mlp_norm(x))
        if self.sandwich:
            x = x + self.post_attn_norm(attn)
            return x + self.post_mlp_norm(ffn(self.mlp_norm(x)))
        x = x + attn
        return x + ffn(self.mlp_norm(x))


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
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)
        self._eager = eager_attention(args)
        # Gemma 3's windowed layers rotate with their own plain base; every other model has one RoPE
        local = replace(args, rope_theta=args.rope_local_theta, rope_scaling=None) \
            if args.rope_local_theta is not None else args
        self._rope_args = [local if args.layer_window(i) else args for i in range(args.num_layers)]
        self._inv_freqs: dict[int, torch.Tensor] = {}   # cached per device: no host copy inside a CUDA graph

    def _ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for each layer, computed once per distinct RoPE."""
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for a in self._rope_args:
            key = id(a)
            if key not in tables:
                inv = self._inv_freqs.get(key)
                if inv is None or inv.device != positions.device:
                    inv = self._inv_freqs[key] = rope_inv_freq(a).to(positions.device)
                tables[key] = rope_cos_sin(positions, inv, a.rope_interleaved, dtype, rope_attention_factor(a))
        return [tables[id(a)] for a in self._rope_args]

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       attn_fn: AttnFn | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.embed(input_ids)
        if self.args.scale_embeddings:   # Gemma: by sqrt(hidden) rounded to the activation dtype, as HF does
            x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)
        ropes: list[Any] = [None] * len(self.layers)
        if self.args.position == "learned":
            x = x + self.pos_embed(positions)
        else:
            ropes = self._ropes(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, ropes[i], attn_fn or self._eager)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.embed.weight) if self.args.tie_word_embeddings else self.lm_head(hidden)
        cap = self.args.final_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn_fn: AttnFn | None = None) -> torch.Tensor:
        return self.logits(self.forward_hidden(input_ids, positions, attn_fn))


def load_model(path_or_id: Any, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Any checkpoint -> (Transformer, LoadedInfo); see `loader.py` (kept apart to spare this file I/O)."""
    from .loader import load_model as _load
    return _load(path_or_id, dtype, device)
