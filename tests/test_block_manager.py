"""Block manager: allocation, ref counts, prefix hits and their safety, freeing and eviction."""

from rosetool.runtime import block_manager as bm_module
from rosetool.runtime.block_manager import BlockManager
from rosetool.runtime.sampling_params import SamplingParams
from rosetool.runtime.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), len(tokens), SamplingParams())


def prefill(bm, s):
    """Allocate and 'compute' the whole sequence, as one scheduler step would."""
    bm.match_prefix(s)
    bm.allocate(s, s.num_uncached_tokens)
    s.num_cached_tokens = s.num_tokens
    bm.commit(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.can_allocate(a, 10) and bm.blocks_needed(a, 10) == 3
    prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == [] and a.num_cached_tokens == 0


def test_can_allocate_refuses_beyond_pool():
    bm = BlockManager(2, 4)
    assert not bm.can_allocate(seq(range(9)), 9)


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(16, 4)
    a, b = seq(range(10), "a"), seq([*range(8), 99, 98, 97], "b")
    prefill(bm, a)
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, 4)
    prefill(bm, seq(range(8), "a"))
    b = seq(range(8), "b")
    bm.match_prefix(b)
    assert b.num_cached_tokens == 4  # the second block holds the last token, so it is recomputed


def test_freed_blocks_stay_hittable_until_reused():
    bm = BlockManager(4, 4)
    a = seq(range(9), "a")
    prefill(bm, a)
    first_blocks = a.block_table[:2]
    bm.free(a)
    b = seq(range(9), "b")
    bm.match_prefix(b)
    assert b.block_table == first_blocks
    bm.free(b)
    prefill(bm, seq(range(100, 116), "c"))  # takes all four blocks: old hashes are evicted
    d = seq(range(9), "d")
    bm.match_prefix(d)
    assert d.block_table == []


def test_hash_collision_with_different_tokens_misses(monkeypatch):
    monkeypatch.setattr(bm_module, "compute_hash", lambda tokens, prefix: b"same")
    bm = BlockManager(16, 4)
    prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    b = seq([9, 9, 9, 9, 5], "b")
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_cached_tokens == 0
    c = seq([1, 2, 3, 4, 7], "c")
    bm.match_prefix(c)
    assert c.num_cached_tokens == 4


def test_prefix_caching_off_never_hits():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    prefill(bm, seq(range(9), "a"))
    b = seq(range(9), "b")
    bm.match_prefix(b)
    assert b.block_table == [] and not bm.hash_to_block
