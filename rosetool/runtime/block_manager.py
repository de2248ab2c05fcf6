"""Paged KV-cache bookkeeping: which physical blocks each sequence owns, shared prefixes, free list.

Full blocks whose K/V has been computed are registered under a chain hash (previous block's hash +
token ids), so a later request with the same prefix reuses them instead of recomputing. A freed block
keeps its hash and contents until it is handed out again, so it can still be revived by a hit.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from rosetool.runtime.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def compute_hash(token_ids: list[int], prefix_hash: bytes | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if prefix_hash is not None:
        h.update(prefix_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered dict as an O(1)-removable FIFO: the longest-free block is evicted first.
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.num_hit_blocks = 0  # statistics: blocks served from the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_cached_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold `num_new_tokens` more tokens after its cached ones."""
        needed = self.blocks_needed(seq, num_new_tokens)
        assert needed <= self.num_free_blocks, "allocate() without can_allocate()"
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so under eviction pressure shared prefix heads survive longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest known prefix of a sequence that holds no blocks yet.

        The last token is never taken from the cache: the model must run on it to produce logits.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return
        prefix_hash = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_tokens(index, self.block_size)
            prefix_hash = compute_hash(tokens, prefix_hash)
            block_id = self.hash_to_block.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        self.num_hit_blocks += len(seq.block_table)
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed (full and computed) blocks for reuse."""
        if not self.enable_prefix_caching:
            return
        full_blocks = seq.num_cached_tokens // self.block_size
        for index in range(seq.num_hashed_blocks, full_blocks):
            prev = self.blocks[seq.block_table[index - 1]].hash if index else None
            tokens = seq.block_tokens(index, self.block_size)
            block = self.blocks[seq.block_table[index]]
            block.hash = compute_hash(tokens, prev)
            block.token_ids = tuple(tokens)
            self.hash_to_block.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full_blocks)

    def _take_free_block(self) -> int:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
