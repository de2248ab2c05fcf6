"""One tensor-parallel rank's slice of a checkpoint, read through the conversion plan.

The cut of every native tensor is declared in the spec beside it (`formats.native`, `tp:`; vocabulary
in specs/llama.yaml). A native tensor is a dim-0 concat of canonical tensors, and each rule's blocks
line up with those sources, so a rank slices each canonical source and fuses its slices: it reads
only its rows/columns straight from safetensors files when the source tensor is stored as is, and
otherwise holds one plan group in full, briefly (the streaming bound conversion already has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch

from ..canonical import ModelArgs
from ..converters.plan import Plan, Step, format_env, make_plan
from ..converters.sources import Checkpoint
from ..errors import RosetoolError
from ..mappings import expr
from ..mappings.ops import Concat


@dataclass(frozen=True)
class Block:
    """`units` equal units of `unit` rows/columns each; a rank takes units/N of them, or, when there
    are fewer units than ranks and `replicate` allows it (KV heads), one unit shared by N/units ranks."""
    units: int
    unit: int
    replicate: bool = False

    def span(self, rank: int, world: int, key: str) -> tuple[int, int]:
        if self.units % world == 0:
            n = self.units // world
            return rank * n * self.unit, (rank + 1) * n * self.unit
        if self.replicate and world % self.units == 0:
            j = rank * self.units // world
            return j * self.unit, (j + 1) * self.unit
        raise RosetoolError(f"{key}: {self.units} {'heads' if self.replicate else 'rows'} cannot be "
                            f"split over tensor_parallel_size={world}")


@dataclass(frozen=True)
class SliceRule:
    """How a native tensor is cut: `dim` None is replicated; otherwise dim is a run of blocks."""
    dim: int | None
    blocks: tuple[Block, ...] = ()


def parse_rule(raw: Any, shape: tuple[int, ...], env: Mapping[str, Any], key: str) -> SliceRule:
    """`column`, `row`, `replicated`, `{dim, parts}` or `{dim, heads: [counts]}` (units of head_dim)."""
    if raw is None or raw == "replicated":
        return SliceRule(None)
    if raw in ("column", "row"):
        dim = 0 if raw == "column" else 1
        return SliceRule(dim, (Block(shape[dim], 1),))
    if isinstance(raw, Mapping) and raw.keys() <= {"dim", "parts", "heads"}:
        dim = int(expr.evaluate(raw.get("dim", 0), env))
        if "heads" in raw:
            head_dim = int(env["head_dim"])
            counts = [int(expr.evaluate(c, env)) for c in raw["heads"]]
            return SliceRule(dim, tuple(Block(c, head_dim, replicate=True) for c in counts))
        parts = int(expr.evaluate(raw.get("parts", 1), env))
        return SliceRule(dim, (Block(shape[dim] // parts, 1),) * parts)
    raise RosetoolError(f"{key}: unknown tp rule {raw!r}; use column, row, replicated, {{dim, parts}} "
                        "or {dim, heads}")


def check_shardable(ckpt: Checkpoint, world: int) -> None:
    """Refuse, before any process starts, a model whose spec does not say how to cut it."""
    args = ModelArgs.from_dict(ckpt.config)
    if world > 1 and args.num_experts:
        raise RosetoolError(f"{ckpt.path}: tensor parallelism does not split mixture-of-experts layers yet "
                            f"({ckpt.spec.name}, {args.num_experts} experts); run it with tensor_parallel_size=1")
    if world > 1 and not any(e.tp is not None for e in ckpt.spec.format("native").entries):
        raise RosetoolError(f"{ckpt.spec.file}: {ckpt.spec.name} declares no tp rules for its native tensors, so "
                            f"tensor parallelism is not available for it yet; run it with tensor_parallel_size=1")
    local_args(args, world)


def local_args(args: ModelArgs, world: int) -> ModelArgs:
    """The config one rank's modules are built from: its share of heads, KV heads, MLP width, vocab."""
    for name in ("num_heads", "intermediate_size", "vocab_size"):
        if getattr(args, name) % world:
            raise RosetoolError(f"tensor_parallel_size={world} does not divide {name}={getattr(args, name)}")
    kv = args.num_kv_heads
    if kv % world and world % kv:
        raise RosetoolError(f"num_kv_heads={kv} can be neither split nor replicated over "
                            f"tensor_parallel_size={world}")
    return replace(args, num_heads=args.num_heads // world, num_kv_heads=max(kv // world, 1),
                   intermediate_size=args.intermediate_size // world, vocab_size=args.vocab_size // world,
                   head_dim=args.head_dim)


def _source_slices(step: Step, rule: SliceRule, rank: int, world: int,
                   where: str) -> list[tuple[int, int, int] | None]:
    """(dim, start, stop) for each canonical source of `step`; None keeps a source whole.

    Query heads are never replicated: `local_args` has already refused a size that does not divide them.
    """
    if rule.dim is None:
        return [None] * len(step.sources)
    if step.chain.ops not in ((), (Concat(0),)):
        raise RosetoolError(f"{where}: native tensor {step.key!r} has ops a tp rule cannot see through")
    in_shapes = step.trace[0]
    if rule.dim == 0:
        sizes = [b.units * b.unit for b in rule.blocks]
        if sizes != [s[0] for s in in_shapes]:
            raise RosetoolError(f"{where}: tp rule of {step.key!r} has blocks {sizes}, its sources "
                                f"have {[s[0] for s in in_shapes]} rows")
        return [(0, *b.span(rank, world, step.key)) for b in rule.blocks]
    (block,) = rule.blocks
    return [(rule.dim, *block.span(rank, world, step.key))] * len(step.sources)


def read_slice(meta: Any, dim: int, start: int, stop: int) -> torch.Tensor:
    """Only the bytes of rows/columns [start, stop) of a tensor stored raw in a file (memory-mapped:
    the pages outside the slice are never read)."""
    shape = list(meta.shape)
    item = meta.dtype.itemsize
    row_bytes = math.prod(shape[1:]) * item
    view = np.memmap(meta.file, np.uint8, "r", offset=meta.start, shape=(shape[0], row_bytes))
    if dim == 0:
        part = view[start:stop]
    else:
        inner = math.prod(shape[2:]) * item
        part = view[:, start * inner: stop * inner]
    shape[dim] = stop - start
    return torch.from_numpy(np.array(part)).view(meta.dtype).reshape(shape)


def _direct_reads(plan: Plan, ckpt: Checkpoint, steps: list[Step]) -> dict[str, Any]:
    """Canonical tensors stored as is in a raw-bytes file: these can be sliced at the source."""
    out = {}
    for step in steps:
        meta = ckpt.tensors[plan.source_keys[step.key]]
        if not step.chain.ops and getattr(meta, "start", None) is not None:
            out[step.sources[0]] = meta
    return out


def shard_state(ckpt: Checkpoint, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s native tensors, group by group (one plan group alive at a time)."""
    plan = make_plan(ckpt, "native", cancel=False)
    fmt = ckpt.spec.format("native")
    env = format_env(fmt, ckpt.config)
    where = str(ckpt.spec.file)
    state: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        direct = _direct_reads(plan, ckpt, group.reads)
        wanted: dict[str, tuple[int, int, int] | None] = {}
        for step in group.writes:
            rule = parse_rule(step.tp, step.shape, env, step.key)
            wanted.update(zip(step.sources, _source_slices(step, rule, rank, world, where)))
        canonical: dict[str, torch.Tensor] = {}
        for name, cut in wanted.items():
            if name in direct and cut is not None:
                canonical[name] = read_slice(direct[name], *cut)
        whole = [s for s in group.reads if not set(s.sources) <= canonical.keys()]
        for step in whole:
            tensors = step.chain.inverse([ckpt.read(plan.source_keys[step.key])], step.trace)
            for name, tensor in zip(step.sources, tensors):
                cut = wanted.get(name)
                canonical[name] = tensor if cut is None else tensor.narrow(cut[0], cut[1], cut[2] - cut[1]).clone()
        for step in group.writes:
            (out,) = step.chain.forward([canonical[s] for s in step.sources])
            state[step.key] = out
        del canonical
    return state


@dataclass(frozen=True)
class TPShard:
    """What the loader needs to build one rank's part of a model instead of the whole."""
    rank: int
    world: int
    group: Any   # torch.distributed.ProcessGroup of the ranks

    def state(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        return shard_state(ckpt, self.rank, self.world)

    def make(self, args: ModelArgs):
        from .model import Transformer
        from .tp_layers import parallelize

        return parallelize(Transformer(local_args(args, self.world)), self.rank, self.group)
