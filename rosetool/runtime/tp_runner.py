"""The model runner of one tensor- or expert-parallel rank, and how the ranks are brought up.

Rank 0 keeps everything stateful (scheduler, block manager, sampler, tokenizer): each step it sends
the flat batch layout its `_prepare` built, every rank runs its shard of the forward on it, and the
vocabulary-sliced logits are gathered once, onto rank 0, for sampling (with tensor_parallel_size 1,
expert parallel only, rank 0 holds the whole vocabulary and samples from its own logits). The other
ranks hold nothing but their weights and their KV heads' cache, and loop on layouts until rank 0 says
stop. Which weights each rank holds is runtime/layout.py's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
from torch import Tensor

from rosetool.converters.sources import open_checkpoint
from rosetool.errors import RosetoolError
from rosetool.runtime.attention import AttentionContext
from rosetool.runtime.config import EngineConfig
from rosetool.runtime.layout import ParallelLayout
from rosetool.runtime.loader import LoadedInfo, load_model
from rosetool.runtime.model import Transformer
from rosetool.runtime.model_runner import ModelRunner
from rosetool.runtime.parallel import (STEP_TIMEOUT, TPGroup, await_workers, exit_with_parent, join_groups,
                                       launched_by_torchrun, rank_device, report, require_no_group,
                                       share_cpu_threads, spawn_workers)
from rosetool.runtime.scheduler import ScheduledBatch
from rosetool.runtime.tp_shard import TPShard, check_shardable

_STEP, _STOP = 1, 0
_HEADER = 7   # kind, tokens, seqs, block-table width, max_query_len, is_decode, logit rows


class TPModelRunner(ModelRunner):
    def __init__(self, model: Transformer, config: EngineConfig, group: TPGroup, layout: ParallelLayout):
        self.group, self.layout = group, layout
        # this rank's own device; eager, as no collectives are captured inside CUDA graphs
        super().__init__(model, replace(config, device=group.device, enforce_eager=True))

    def _default_num_blocks(self) -> int:
        """The smallest pool any rank can hold, so block ids mean the same slots everywhere."""
        blocks = torch.tensor([super()._default_num_blocks()])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.group.control)
        return int(blocks)

    def run(self, batch: ScheduledBatch) -> tuple[list[int], list[float | None]]:
        try:
            return super().run(batch)
        except RuntimeError as exc:   # gloo/NCCL report a lost peer or a timeout as RuntimeError
            error = self.group.failure(exc)
            self.group.close(grace_s=1.0)   # the others are likely stuck in a collective: do not wait long
            raise error from None

    def forward_logits(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                       logit_rows: list[int]) -> Tensor | None:
        if self.group.rank == 0:
            self._send_layout(input_ids, positions, ctx, logit_rows)
        whole_vocab = self.layout.tp == 1
        if whole_vocab and self.group.rank > 0:
            logit_rows = []   # rank 0 samples from its own logits
        logits = super().forward_logits(input_ids, positions, ctx, logit_rows)
        if logits is None or whole_vocab:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.group.world)] if self.group.rank == 0 else None
        dist.gather(logits.contiguous(), parts, dst=0, group=self.group.compute)
        return torch.cat(parts, dim=-1) if parts else None

    def _send_layout(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                     logit_rows: list[int]) -> None:
        header = torch.tensor([_STEP, len(input_ids), len(ctx.context_lens), ctx.block_tables.shape[1],
                               ctx.max_query_len, int(ctx.is_decode), len(logit_rows)])
        body = torch.cat([t.view(-1) for t in (input_ids, positions, ctx.slot_mapping, ctx.token_seq,
                                               ctx.token_row, ctx.block_tables, ctx.context_lens)]
                         + [torch.tensor(logit_rows, dtype=torch.long, device=self.device)])
        self._announce(header)
        dist.broadcast(body, 0, group=self.group.compute)

    def _announce(self, header: Tensor) -> None:
        """The control group waits as long as workers idle; rank 0 must not wait that long on a hung one."""
        dist.broadcast(header, 0, group=self.group.control, async_op=True).wait(STEP_TIMEOUT)

    def _receive_layout(self) -> tuple[Tensor, Tensor, AttentionContext, list[int]] | None:
        header = torch.empty(_HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group.control)
        kind, tokens, seqs, width, max_query_len, is_decode, rows = header.tolist()
        if kind == _STOP:
            return None
        body = torch.empty(5 * tokens + seqs * width + seqs + rows, dtype=torch.long, device=self.device)
        dist.broadcast(body, 0, group=self.group.compute)
        ids, pos, slots, token_seq, token_row, tables, lens, logit_rows = body.split(
            [tokens] * 5 + [seqs * width, seqs, rows])
        ctx = AttentionContext(slots, pos, token_seq, token_row, tables.view(seqs, width), lens, max_query_len,
                               bool(is_decode))
        return ids, pos, ctx, logit_rows.tolist()

    @torch.inference_mode()
    def serve(self) -> None:
        """A worker's life after loading: run whatever rank 0 schedules, until it says stop."""
        while (layout := self._receive_layout()) is not None:
            self.forward_logits(*layout)

    def close(self) -> None:
        """Rank 0: tell the workers to stop, then join them; safe to call twice or after a failure."""
        if self.group.compute is None:
            return
        try:
            self._announce(torch.tensor([_STOP] + [0] * (_HEADER - 1)))
        except RuntimeError:   # a worker is already gone: close() below still reaps the rest
            pass
        self.group.close()


def _load(model: str, config: EngineConfig, group: TPGroup,
          layout: ParallelLayout) -> tuple[Transformer, LoadedInfo]:
    shard = TPShard(group.rank, layout.tp, group.compute, layout.ep)
    return load_model(model, dtype=config.dtype, device=group.device, shard=shard, adapters=config.adapters)


def _worker(rank: int, world: int, init_method: str, parent_pid: int, pipe: Connection | None, threads: int,
            model: str, config: EngineConfig, layout: ParallelLayout) -> None:
    """A spawned (or torchrun) rank > 0: join, load its shard, serve, and exit without a traceback."""
    if parent_pid:
        exit_with_parent(parent_pid)
        share_cpu_threads(config.device, world, threads)
    group = TPGroup(rank, world, rank_device(config.device, int(os.environ.get("LOCAL_RANK", rank))))
    try:
        report(pipe, "joining")
        join_groups(group, init_method)
        loaded, _ = _load(model, config, group, layout)
        report(pipe, "loaded")
        TPModelRunner(loaded, config, group, layout).serve()
    except Exception as exc:   # rank 0 gone mid-collective, or a load failure: one line, to rank 0
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = first if isinstance(exc, RosetoolError) else f"{type(exc).__name__}: {first}"
        if pipe is None:
            print(f"error: tensor-parallel rank {rank}: {message}", file=sys.stderr)
        report(pipe, message)
        sys.exit(2 if isinstance(exc, RosetoolError) else 1)
    finally:
        group.close()


def start(model: str, config: EngineConfig, layout: ParallelLayout) -> tuple[Transformer, LoadedInfo, TPModelRunner]:
    """Rank 0's shard, runner and workers. Under torchrun a rank > 0 serves here and then exits."""
    check_shardable(open_checkpoint(model), layout.tp, layout.ep)   # a bad size or model: refused before any spawn
    require_no_group()
    world = layout.world
    if launched_by_torchrun():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != size:
            raise RosetoolError(f"{layout.describe()} needs {world} ranks but torchrun started WORLD_SIZE={size}")
        if rank > 0:
            _worker(rank, size, "env://", 0, None, torch.get_num_threads(), model, config, layout)
            sys.exit(0)
        group = TPGroup(0, size, rank_device(config.device, int(os.environ.get("LOCAL_RANK", 0))))
        init_method = "env://"
    else:
        group, init_method = spawn_workers(world, config.device, _worker, (model, config, layout))
        group.threads = torch.get_num_threads()
        share_cpu_threads(config.device, world, group.threads)
    try:
        if group.workers:
            await_workers(group, "joining", "starting")
        join_groups(group, init_method)
        loaded, info = _load(model, config, group, layout)
        if group.workers:
            await_workers(group, "loaded", "loading its shard")
        return loaded, info, TPModelRunner(loaded, config, group, layout)
    except BaseException:
        group.close()
        raise
