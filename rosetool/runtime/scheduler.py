"""Continuous batching with chunked prefill and recompute-style preemption.

Every step spends a token budget: running sequences first (one token each when decoding, the next
chunk when their prefill was split), then waiting ones in arrival order. When blocks run out the newest
running sequence is preempted: its blocks are freed and it returns to the front of the queue, to be
recomputed later. The oldest running sequence is therefore never starved, and since the pool always
holds one `max_model_len` sequence, every step makes progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rosetool.runtime.block_manager import BlockManager
from rosetool.runtime.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """Every sequence feeds exactly its last token: the shape CUDA graphs are captured for."""
        return bool(self.seqs) and all(
            n == 1 and s.num_uncached_tokens == 1 for s, n in zip(self.seqs, self.num_new_tokens))

    def completes_prefill(self, index: int) -> bool:
        """Whether this step reaches the sequence's last token, so its logits are needed."""
        return self.num_new_tokens[index] == self.seqs[index].num_uncached_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        budget, preempted = self._schedule_running(batch, budget)
        if not preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's K/V is now in the cache (before sampled tokens are appended)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_cached_tokens += n
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncached_tokens, budget)
            while not self.block_manager.can_allocate(seq, n) and seq in self.running:
                self._preempt(self.running[-1])
                preempted = True
            if seq not in self.running:
                break
            self.block_manager.allocate(seq, n)
            batch.add(seq, n)
            budget -= n
            index += 1
        return budget, preempted

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.match_prefix(seq)
            n = min(seq.num_uncached_tokens, budget)
            if not self.block_manager.can_allocate(seq, n):
                self.block_manager.free(seq)  # hand prefix hits back until it can really start
                return
            self.block_manager.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
