"""The torch paged-attention reference against dense attention computed the obvious way."""

import math

import pytest
import torch

from rosetool.runtime.attention import AttentionContext, gather_kv, paged_attention, store_kv


def build_paged(seq_lens, query_lens, num_blocks, block_size, kv_heads, head_dim, seed=0):
    """Scatter random per-sequence K/V into a shuffled block pool; return cache, context, dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
    dense, slots, positions, token_seq, token_row = [], [], [], [], []
    for b, (n, q_len) in enumerate(zip(seq_lens, query_lens)):
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        tables[b, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        seq_slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(n)])
        store_kv(k, v, k_cache, v_cache, seq_slots)
        dense.append((k, v))
        slots.append(seq_slots[n - q_len:])
        positions += range(n - q_len, n)
        token_seq += [b] * q_len
        token_row += range(q_len)
    ctx = AttentionContext(
        slot_mapping=torch.cat(slots), positions=torch.tensor(positions),
        token_seq=torch.tensor(token_seq), token_row=torch.tensor(token_row), block_tables=tables,
        context_lens=torch.tensor(seq_lens), max_query_len=max(query_lens),
        is_decode=all(q == 1 for q in query_lens))
    return k_cache, v_cache, ctx, dense


def dense_attention(q, k, v, positions, window):
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    key_pos = torch.arange(k.shape[0])
    mask = key_pos[None, :] <= positions[:, None]
    if window is not None:
        mask &= positions[:, None] - key_pos[None, :] < window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def assert_matches_dense(q, k_cache, v_cache, ctx, dense, seq_lens, query_lens, window):
    """Paged attention over the whole batch equals dense attention of each sequence's new queries."""
    head_dim = q.shape[-1]
    out = paged_attention(q, k_cache, v_cache, ctx, 1 / math.sqrt(head_dim), window)
    start = 0
    for (k, v), q_len, n in zip(dense, query_lens, seq_lens):
        expected = dense_attention(q[start:start + q_len], k, v, torch.arange(n - q_len, n), window)
        torch.testing.assert_close(out[start:start + q_len], expected, rtol=1e-5, atol=1e-5)
        start += q_len


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [7, 1, 12]])
def test_paged_attention_matches_dense(query_lens, window):
    seq_lens, heads, kv_heads, head_dim = [9, 20, 33], 4, 2, 8
    k_cache, v_cache, ctx, dense = build_paged(seq_lens, query_lens, 24, 4, kv_heads, head_dim)
    q = torch.randn(sum(query_lens), heads, head_dim)
    assert_matches_dense(q, k_cache, v_cache, ctx, dense, seq_lens, query_lens, window)


# The fast paths: equal-length decode (no mask, window as a slice), one fresh prompt (causal, no mask),
# one chunked prompt, single-query groups, and the general masked grid; 1, 2 and 6 query heads per K/V head.
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("seq_lens,query_lens", [
    ([13, 13, 13, 13], [1, 1, 1, 1]), ([13], [13]), ([22], [6]), ([5, 17], [5, 1]), ([1, 1], [1, 1]),
])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (6, 1)])
def test_paged_attention_fast_paths_match_dense(seq_lens, query_lens, window, heads, kv_heads):
    head_dim = 8
    k_cache, v_cache, ctx, dense = build_paged(seq_lens, query_lens, 32, 4, kv_heads, head_dim, seed=len(seq_lens))
    q = torch.randn(sum(query_lens), heads, head_dim)
    assert_matches_dense(q, k_cache, v_cache, ctx, dense, seq_lens, query_lens, window)


def test_store_kv_skips_padding_slots():
    k_cache = torch.zeros(2, 2, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 1, 2)
    store_kv(k, 2 * k, k_cache, v_cache, torch.tensor([3, -1, 0]))
    assert k_cache.flatten(0, 1)[:, 0, 0].tolist() == [1, 0, 0, 1]
    assert v_cache.flatten(0, 1)[:, 0, 0].tolist() == [2, 0, 0, 2]


@pytest.mark.parametrize("first,end", [(0, 1), (0, 23), (5, 23), (8, 16), (13, 14), (7, 40)])
def test_gather_kv_by_blocks_equals_slot_by_slot(first, end):
    """Whole-block copies sliced to [first, end) read the same slots as indexing each position's slot."""
    block_size, kv_heads, head_dim = 8, 3, 5
    g = torch.Generator().manual_seed(first * 100 + end)
    k_cache, v_cache = (torch.randn(11, block_size, kv_heads, head_dim, generator=g) for _ in range(2))
    tables = torch.stack([torch.randperm(11, generator=g)[:5] for _ in range(3)])
    pos = torch.arange(first, end)
    slots = tables[:, pos // block_size] * block_size + pos % block_size
    keys, values = gather_kv(k_cache, v_cache, tables, first, end)
    assert torch.equal(keys, k_cache.flatten(0, 1)[slots]) and torch.equal(values, v_cache.flatten(0, 1)[slots])
