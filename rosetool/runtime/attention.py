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
    store_rows(k, k_cache, slot_mapping)
    store_rows(v, v_cache, slot_mapping)


def store_rows(x: Tensor, cache: Tensor, slot_mapping: Tensor) -> None:
    keep = slot_mapping >= 0
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping[keep], x[keep].to(cache.dtype))


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: AttentionContext,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """Causal attention of the step's queries ([N, heads, head_dim]) over the paged cache.

    Queries sit in a padded [B, max_query_len] grid so all sequences run in one SDPA call; padding rows
    get position 0 (they see key 0 only) so no row is fully masked. Keys are gathered slot by slot up
    to the longest context only, K/V heads are shared by their query groups inside SDPA (`enable_gqa`,
    no copies), and the mask is left out when every query sees every gathered key (a decode step of
    equal-length sequences) or plain causality covers it (one fresh prompt). Options for other
    attention variants arrive as further keyword arguments.
    """
    num_seqs, query_len = ctx.block_tables.shape[0], ctx.max_query_len
    lens = ctx.context_lens.tolist() if ctx.context_lens.device.type == "cpu" else None
    if ctx.is_decode:
        q_pad = q[:, None]   # one token per sequence, in batch order
    elif num_seqs == 1:
        q_pad = q[None]      # the one sequence's new tokens, in order
    else:
        q_pad = q.new_zeros(num_seqs, query_len, *q.shape[1:])
        q_pad[ctx.token_seq, ctx.token_row] = q
    span = max(lens) if lens else ctx.block_tables.shape[1] * k_cache.shape[1]
    first = 0
    uniform = lens is not None and min(lens) == span
    if uniform and ctx.is_decode and sliding_window is not None:
        first = max(0, span - sliding_window)   # the window is a slice when every query is last
    keys, values = gather_kv(k_cache, v_cache, ctx.block_tables, first, span)
    mask, causal = None, False
    if not (uniform and ctx.is_decode):
        if uniform and num_seqs == 1 and query_len == span and sliding_window is None:
            causal = True
        else:
            mask = _mask(ctx, q_pad.shape[1], span, sliding_window)
    out = attend(q_pad.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
                 mask, scale, softcap, is_causal=causal)
    out = out.transpose(1, 2)
    if ctx.is_decode:
        return out[:, 0]
    return out[0] if num_seqs == 1 else out[ctx.token_seq, ctx.token_row]


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, first: int, end: int) -> tuple[Tensor, Tensor]:
    """Each sequence's cached K/V for positions [first, end): [B, end - first, kv_heads, head_dim].

    Copies whole blocks (`index_select` of contiguous block rows, one memcpy each) and slices the span
    out of them: on CPU a per-slot advanced index was 12% of a 32-sequence GPT-2 decode step."""
    block_size = k_cache.shape[1]
    lo, hi = first // block_size, -(-end // block_size)
    blocks = block_tables[:, lo:hi].flatten()
    start = first - lo * block_size

    def take(cache: Tensor) -> Tensor:
        rows = cache.index_select(0, blocks).view(block_tables.shape[0], (hi - lo) * block_size, *cache.shape[2:])
        return rows[:, start: start + end - first]
    return take(k_cache), take(v_cache)


def _mask(ctx: AttentionContext, query_len: int, span: int, sliding_window: int | None) -> Tensor:
    """[B, 1, query_len, span]: key j is visible to a query at position p when j <= p (and p - j < window)."""
    q_pos = torch.zeros(ctx.block_tables.shape[0], query_len, dtype=torch.long, device=ctx.positions.device)
    q_pos[ctx.token_seq, ctx.token_row] = ctx.positions
    key_pos = torch.arange(span, device=q_pos.device)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - key_pos[None, None, :] < sliding_window
    return mask[:, None]


class PagedAttention:
    """The `attn_fn` handed to the model: store this step's K/V, then attend over the paged cache.

    `context` is set by the model runner before each forward and cleared after it, so all per-step
    state lives in exactly one place.
    """

    def __init__(self, k_cache: Tensor, v_cache: Tensor, scale: float,
                 sliding_window: int | None | Sequence[int | None], use_triton: bool, softcap: float | None = None,
                 latent: bool = False):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, blocks, block_size, kv_heads, D]
        self.latent = latent   # latent attention: v_cache is a view of k_cache's first dims, stored with K
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

            triton_kernels.store_kv(k, None if self.latent else v, k_cache, None if self.latent else v_cache,
                                    ctx.slot_mapping)
            if ctx.is_decode:
                out = triton_kernels.paged_decode_attention(
                    q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale, window)
                return out[None]
        elif self.latent:
            store_rows(k, k_cache, ctx.slot_mapping)
        else:
            store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        return paged_attention(q, k_cache, v_cache, ctx, self.scale, window, self.softcap)[None]
