"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

Decode batches are small and launch-bound, so replaying one captured graph instead of launching every
kernel pays off. A batch is padded up to the next captured size; padding rows carry slot -1 (nothing
stored) and context length 0 (the decode kernel returns zeros for them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rosetool.runtime.attention import AttentionContext, PagedAttention


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, attention: PagedAttention, max_batch: int,
                 max_blocks_per_seq: int, device: torch.device):
        self.model, self.attention = model, attention
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slot_mapping = torch.full((max_batch,), -1, **long)
        self.context_lens = torch.zeros(max_batch, **long)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, **long)
        self.token_seq = torch.arange(max_batch, **long)
        self.token_row = torch.zeros(max_batch, **long)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._capture_all(max_batch)

    def _context(self, size: int) -> AttentionContext:
        return AttentionContext(
            slot_mapping=self.slot_mapping[:size], positions=self.positions[:size],
            token_seq=self.token_seq[:size], token_row=self.token_row[:size],
            block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
            max_query_len=1, is_decode=True)

    def _forward(self, size: int) -> Tensor:
        return self.model.forward_hidden(self.input_ids[None, :size], self.positions[None, :size],
                                         attn_fn=self.attention)[0]

    @torch.inference_mode()
    def _capture_all(self, max_batch: int) -> None:
        pool = None
        for size in reversed(batch_size_ladder(max_batch)):  # largest first: later ones reuse its pool
            self.attention.context = self._context(size)
            self._forward(size)  # warm-up outside the graph (lazy inits, Triton compilation)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        self.attention.context = None
        torch.cuda.synchronize()

    def run(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor,
            block_tables: Tensor, context_lens: Tensor) -> Tensor:
        """Hidden states [batch, hidden] for a decode batch no larger than `max_batch`."""
        batch = input_ids.shape[0]
        size = min(s for s in self.graphs if s >= batch)
        self.slot_mapping.fill_(-1)
        self.context_lens.zero_()
        self.input_ids[:batch] = input_ids
        self.positions[:batch] = positions
        self.slot_mapping[:batch] = slot_mapping
        self.context_lens[:batch] = context_lens
        self.block_tables[:batch, : block_tables.shape[1]] = block_tables
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:batch]
