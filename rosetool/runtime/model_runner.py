"""Runs one scheduled batch: flat tensors in, sampled tokens out; owns the paged KV cache.

The model sees every step as a single row (B=1, T=all scheduled tokens) with explicit positions;
`PagedAttention` uses the step's `AttentionContext` to route each token's K/V into its slot and to
find its sequence's earlier K/V through the block table.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from rosetool.runtime.attention import AttentionContext, PagedAttention
from rosetool.runtime.config import EngineConfig
from rosetool.runtime.cpu_layout import make_weights_column_major
from rosetool.runtime.host import available_memory, cpu_threads, lazily_zeroed
from rosetool.runtime.scheduler import ScheduledBatch
from rosetool.runtime.sampler import sample
from rosetool.runtime.triton_kernels import triton_available
from rosetool.errors import RosetoolError

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig):
        self.model, self.config = model, config
        self.args = model.args
        self.device = config.device
        self.block_size = config.block_size
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads())   # see runtime/host.py: the default oversubscribes
            make_weights_column_major(model)        # see runtime/cpu_layout.py: faster decode matmuls
        self.num_kv_blocks = config.num_kv_blocks or self._default_num_blocks()
        k_cache, v_cache = self._allocate_cache()
        # the Triton decode kernel has no soft-cap: capped models (Gemma 2) take the torch path
        use_triton = self.device.type == "cuda" and triton_available() and self.args.attn_softcap is None
        windows = [self.args.layer_window(i) for i in range(self.args.num_layers)]
        self.attention = PagedAttention(k_cache, v_cache, self.args.attn_scale, windows, use_triton,
                                        self.args.attn_softcap, latent=self.args.is_mla)
        self.max_model_len = min(self._model_len_limit(), self.num_kv_blocks * self.block_size)
        if self.max_model_len < self._model_len_limit():
            log.warning("KV pool of %d blocks holds %d tokens: max_model_len lowered from %d to %d",
                        self.num_kv_blocks, self.max_model_len, self._model_len_limit(), self.max_model_len)
        self.graphs = None
        if use_triton and not config.enforce_eager:
            self.graphs = self._capture_graphs()

    def _cache_rows(self) -> tuple[tuple[int, int], int]:
        """(K heads, K width) of one token's cache entry per layer, and how many such tensors (K and V, or
        latent attention's one latent whose first kv_lora_rank dims double as V)."""
        a = self.args
        if a.is_mla:
            return (1, a.kv_lora_rank + a.qk_rope_head_dim), 1
        return (a.num_kv_heads, a.head_dim), 2

    def _allocate_cache(self) -> tuple[Tensor, Tensor]:
        (heads, width), count = self._cache_rows()
        shape = (self.args.num_layers, self.num_kv_blocks, self.block_size, heads, width)
        if self.device.type == "cpu":
            caches = [lazily_zeroed(shape, self.dtype) for _ in range(count)]
        else:
            caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(count)]
        if count == 1:
            return caches[0], caches[0][..., :self.args.kv_lora_rank]
        return caches[0], caches[1]

    def _model_len_limit(self) -> int:
        return self.config.max_model_len or self.args.max_position_embeddings

    def _block_bytes(self) -> int:
        (heads, width), count = self._cache_rows()
        return count * self.args.num_layers * self.block_size * heads * width * self.dtype.itemsize

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _default_num_blocks(self) -> int:
        one_seq = self._blocks_for(self._model_len_limit())
        if self.device.type == "cuda":
            return self._cuda_blocks()
        return self._cpu_blocks(one_seq)

    def _cuda_blocks(self) -> int:
        """What fits, never one full context more: max_position_embeddings is a config's word, and a pool
        sized from 10^12 of them would be an out-of-memory error instead of a lowered max_model_len."""
        fits = self._cuda_free_blocks()
        if fits < 1:
            raise RosetoolError("LLM: not enough free GPU memory for one KV block "
                                f"({self._block_bytes():,} bytes); lower block_size or free memory")
        return fits

    def _cpu_blocks(self, one_seq: int) -> int:
        """Like `gpu_memory_utilization` on CUDA: that fraction of available memory, capped by what
        `max_num_seqs` full contexts can use. Pages are backed only once written (runtime/host.py),
        so the cap costs nothing until sequences fill it."""
        fits = int(available_memory() * self.config.gpu_memory_utilization) // self._block_bytes()
        if fits < 1:
            raise RosetoolError("LLM: not enough free memory for one KV block "
                                f"({self._block_bytes():,} bytes); lower block_size or free memory")
        return min(fits, self.config.max_num_seqs * one_seq)

    @torch.inference_mode()
    def _cuda_free_blocks(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of free memory, after the activation peak of
        a full prefill step (measured with a dummy eager forward)."""
        tokens = min(self.config.max_num_batched_tokens, self._model_len_limit())
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        dummy = torch.zeros(1, tokens, dtype=torch.long, device=self.device)
        self.model.logits(self.model.forward_hidden(dummy)[0, -self.config.max_num_seqs:])
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return int((free * self.config.gpu_memory_utilization - peak) // self._block_bytes())

    def _capture_graphs(self):
        from rosetool.runtime.cuda_graphs import DecodeGraphs

        try:
            return DecodeGraphs(self.model, self.attention, self.config.max_num_seqs,
                                self._blocks_for(self.max_model_len), self.device)
        except Exception as exc:  # a model that cannot be captured still runs, eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
            self.attention.context = None
            return None

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float | None]]:
        """Forward the batch; sample for sequences whose last token was fed (batch order)."""
        logits = self.forward_logits(*self._prepare(batch))
        if logits is None:
            return [], []
        seqs = [s for i, s in enumerate(batch.seqs) if batch.completes_prefill(i)]
        return sample(logits, seqs)

    def forward_logits(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                       logit_rows: list[int]) -> Tensor | None:
        """Logits of the `logit_rows` tokens, None when no row completes a prompt."""
        if self.graphs is not None and ctx.is_decode:
            hidden = self.graphs.run(input_ids, positions, ctx.slot_mapping, ctx.block_tables,
                                     ctx.context_lens)
        else:
            self.attention.context = ctx
            try:
                hidden = self.model.forward_hidden(input_ids[None], positions[None],
                                                   attn_fn=self.attention)[0]
            finally:
                self.attention.context = None
        if not logit_rows:
            return None
        return self.model.logits(hidden[torch.tensor(logit_rows, device=self.device)])

    def _prepare(self, batch: ScheduledBatch) -> tuple[Tensor, Tensor, AttentionContext, list[int]]:
        bs = self.block_size
        ids, pos, slots, token_seq, token_row, context_lens, logit_rows = [], [], [], [], [], [], []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_cached_tokens
            ids += seq.token_ids[start: start + n]
            pos += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            token_seq += [b] * n
            token_row += range(n)
            context_lens.append(start + n)
            if batch.completes_prefill(b):
                logit_rows.append(len(ids) - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]

        def as_tensor(values) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        positions = as_tensor(pos)
        ctx = AttentionContext(
            slot_mapping=as_tensor(slots), positions=positions, token_seq=as_tensor(token_seq),
            token_row=as_tensor(token_row), block_tables=as_tensor(tables),
            context_lens=as_tensor(context_lens), max_query_len=max(batch.num_new_tokens),
            is_decode=batch.is_decode)
        return as_tensor(ids), positions, ctx, logit_rows
