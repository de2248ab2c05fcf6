"""Paged attention in plain torch (CPU and CUDA): the reference the Triton kernels are checked against.

The cache for one layer is `[num_blocks, block_size, num_kv_heads, head_dim]`; a token's slot is
`block_id * block_size + offset`. A step's queries are a flat list of tokens from several sequences;
each sequence's keys are its cached prefix (possibly shared blocks or earlier chunks) plus this step's
tokens, already written to the cache before attention runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .softcap import attend


@dataclass(slots=True)
class AttentionContext:
    """Per-step layout of the flat batch; built once per step, shared by all layers."""

    slot_mapping: Tensor  # [N] cache slot of each new token, -1 for padding rows
    positions: Tensor  # [N] position of each new token within its sequence
    token_seq: Tensor  # [N] which sequence (row of block_tables) each token belongs to
    token_row: Tensor  # [N] index of the token among its sequence's new tokens
    block_tables: Tensor  # [B, max_blocks] physical block ids, padded with 0
    context_lens: Tensor  # [B] tokens in the cache after this step's tokens are stored
    max_query_len: int
    is_decode: bool  # one token per sequence, each its sequence's last


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write `k`/`v` ([N, kv_heads, head_dim]) into their slots; rows with slot -1 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: AttentionContext,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """Causal attention of the step's queries ([N, heads, head_dim]) over the paged cache.

    Queries are scattered into a padded [B, max_query_len] grid so all sequences run in one SDPA call;
    padding rows get position 0 (they see key 0 only) so no row is fully masked.
    """
    num_seqs = ctx.block_tables.shape[0]
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    q_pad = q.new_zeros(num_seqs, ctx.max_query_len, heads, head_dim)
    q_pad[ctx.token_seq, ctx.token_row] = q
    q_pos = torch.zeros(num_seqs, ctx.max_query_len, dtype=torch.long, device=q.device)
    q_pos[ctx.token_seq, ctx.token_row] = ctx.positions

    keys = k_cache[ctx.block_tables].flatten(1, 2)  # [B, max_blocks * block_size, kv_heads, D]
    values = v_cache[ctx.block_tables].flatten(1, 2)
    key_pos = torch.arange(keys.shape[1], device=q.device)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - key_pos[None, None, :] < sliding_window

    group = heads // kv_heads
    keys = keys.repeat_interleave(group, dim=2).to(q.dtype)
    values = values.repeat_interleave(group, dim=2).to(q.dtype)
    out = attend(q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask[:, None], scale, softcap)
    return out.transpose(1, 2)[ctx.token_seq, ctx.token_row]


class PagedAttention:
    """The `attn_fn` handed to the model: store this step's K/V, then attend over the paged cache.

    `context` is set by the model runner before each forward and cleared after it, so all per-step
    state lives in exactly one place.
    """

    def __init__(self, k_cache: Tensor, v_cache: Tensor, scale: float,
                 sliding_window: int | None | Sequence[int | None], use_triton: bool, softcap: float | None = None):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, blocks, block_size, kv_heads, D]
        self.scale = scale
        self.sliding_window = sliding_window   # one for all layers, or one per layer (Gemma 2 alternates)
        self.softcap = softcap
        self.use_triton = use_triton
        self.context: AttentionContext | None = None

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx = self.context
        assert ctx is not None, "PagedAttention called outside a model-runner step"
        q, k, v = q[0], k[0], v[0]
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]
        window = self.sliding_window
        if isinstance(window, Sequence):
            window = window[layer_idx]
        if self.use_triton:
            from rosetool.runtime import triton_kernels

            triton_kernels.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
            if ctx.is_decode:
                out = triton_kernels.paged_decode_attention(
                    q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale, window)
                return out[None]
        else:
            store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        return paged_attention(q, k_cache, v_cache, ctx, self.scale, window, self.softcap)[None]
