"""One tensor-parallel rank's slice of a checkpoint, read through the conversion plan.

The cut of every native tensor is declared in the spec beside it (`formats.native`, `tp:`; vocabulary
in specs/llama.yaml). A native tensor is a dim-0 concat of canonical tensors, and each rule's blocks
line up with those sources, so a rank slices each canonical source and fuses its slices: it reads
only its rows/columns straight from safetensors files when the source tensor is stored as is, and
otherwise holds one plan group in full, briefly (the streaming bound conversion already has).

Stacked experts ([E, ...] from per-expert sources) follow `{experts: column|row}`: a rank keeps only the
experts its expert-parallel group holds (runtime/layout.py) and never reads the others' bytes (per-expert
source tensors are skipped; a stacked native one is read for its own experts' rows only), and cuts each
kept expert like a dense `column`/`row` tensor over the ranks sharing it.
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
from ..mappings.ops import Concat, Stack
from .layout import ParallelLayout

SKIP = "skip"   # a canonical source another rank holds (an expert placed elsewhere): never read here
Cut = tuple[int, int, int] | None   # (dim, start, stop) of a canonical source, or None: whole


@dataclass(frozen=True)
class Block:
    """`units` equal units of `unit` rows/columns each; a rank takes units/N of them, or, when there
    are fewer units than ranks and `replicate` allows it (KV heads), one unit shared by N/units ranks."""
    units: int
    unit: int
    replicate: bool = False

    def span(self, rank: int, world: int, key: str, ranks: str | None = None) -> tuple[int, int]:
        """`ranks` names the ranks in a refusal (default: tensor_parallel_size=world)."""
        if self.units % world == 0:
            n = self.units // world
            return rank * n * self.unit, (rank + 1) * n * self.unit
        if self.replicate and world % self.units == 0:
            j = rank * self.units // world
            return j * self.unit, (j + 1) * self.unit
        raise RosetoolError(f"{key}: {self.units} {'heads' if self.replicate else 'rows'} cannot be "
                            f"split over {ranks or f'tensor_parallel_size={world}'}")


@dataclass(frozen=True)
class SliceRule:
    """How a native tensor is cut: `dim` None is replicated; otherwise dim is a run of blocks. With
    `experts`, dim 0 stacks experts, placed whole by expert parallel, and `dim` is the dim of each
    expert's own sources that its expert tensor-parallel ranks split."""
    dim: int | None
    blocks: tuple[Block, ...] = ()
    experts: bool = False


def parse_rule(raw: Any, shape: tuple[int, ...], env: Mapping[str, Any], key: str) -> SliceRule:
    """`column`, `row`, `replicated`, `{dim, parts}`, `{dim, heads: [counts]}` (units of head_dim) or
    `{experts: column|row}`."""
    if raw is None or raw == "replicated":
        return SliceRule(None)
    if isinstance(raw, Mapping) and raw.keys() == {"experts"} and raw["experts"] in ("column", "row"):
        return SliceRule(0 if raw["experts"] == "column" else 1, experts=True)
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
    raise RosetoolError(f"{key}: unknown tp rule {raw!r}; use column, row, replicated, {{dim, parts}}, "
                        "{dim, heads} or {experts: column|row}")


def check_shardable(ckpt: Checkpoint, tp: int, ep: int = 1) -> None:
    """Refuse, before any process starts, a layout or model the spec's rules cannot cut: every rank's
    cuts are worked out from the plan's shapes (no data read), so a size that does not divide is named
    with its tensor."""
    layout = ParallelLayout(tp, ep)
    args = ModelArgs.from_dict(ckpt.config)
    if ep > 1 and not args.num_experts:
        raise RosetoolError(f"{ckpt.path}: expert_parallel_size={ep} needs a mixture-of-experts model, and "
                            f"{ckpt.spec.name} has no experts; use tensor_parallel_size instead")
    if layout.world > 1 and not any(e.tp is not None for e in ckpt.spec.format("native").entries):
        raise RosetoolError(f"{ckpt.spec.file}: {ckpt.spec.name} declares no tp rules for its native tensors, so "
                            f"tensor parallelism is not available for it yet; run it with tensor_parallel_size=1")
    local_args(args, tp, ep)
    plan = make_plan(ckpt, "native", cancel=False)
    env = format_env(ckpt.spec.format("native"), ckpt.config)
    try:
        for rank in range(layout.world):
            for group in plan.groups:
                _rank_cuts(group.writes, env, rank, layout, str(ckpt.spec.file))
    except RosetoolError as exc:
        raise RosetoolError(f"{ckpt.path}: {exc}") from None


def local_args(args: ModelArgs, tp: int, ep: int = 1) -> ModelArgs:
    """The config one rank's modules are built from: its share of heads, KV heads, MLP and shared-expert
    width, vocab, and of each routed expert's width (the router still sees every expert)."""
    layout = ParallelLayout(tp, ep)
    if tp > 1 and args.qk_norm_full_width:
        raise RosetoolError(f"tensor_parallel_size={tp}: the q/k norm over all heads at once (qk_norm_full_width, "
                            "OLMoE) would need every head on each rank; use expert_parallel_size instead")
    dense = not args.num_experts or any(not args.is_moe_layer(i) for i in range(args.num_layers))
    names = ["num_heads", "vocab_size"] + ["intermediate_size"] * dense
    names += ["shared_expert_intermediate_size"] * bool(args.shared_expert_intermediate_size)
    for name in names:
        if getattr(args, name) % tp:
            raise RosetoolError(f"tensor_parallel_size={tp} does not divide {name}={getattr(args, name)}")
    kv = args.num_kv_heads
    if kv % tp and tp % kv:
        raise RosetoolError(f"num_kv_heads={kv} can be neither split nor replicated over "
                            f"tensor_parallel_size={tp}")
    moe = {}
    if args.num_experts:   # a width ETP does not divide is refused by check_shardable, naming the tensor
        moe = dict(moe_intermediate_size=args.moe_intermediate_size // layout.etp,
                   shared_expert_intermediate_size=args.shared_expert_intermediate_size // tp)
    return replace(args, num_heads=args.num_heads // tp, num_kv_heads=max(kv // tp, 1),
                   intermediate_size=args.intermediate_size // tp if dense else args.intermediate_size,
                   vocab_size=args.vocab_size // tp, head_dim=args.head_dim, **moe)


def _source_slices(step: Step, rule: SliceRule, rank: int, layout: ParallelLayout, where: str,
                   num_experts: int) -> list[Cut | str]:
    """A cut (or SKIP) for each canonical source of `step`; None keeps a source whole.

    Query heads are never replicated: `local_args` has already refused a size that does not divide them.
    """
    ops = step.chain.ops
    if rule.experts:
        return _expert_slices(step, rule, rank, layout, where, num_experts)
    if any(isinstance(op, Stack) for op in ops) and layout.world > 1:
        raise RosetoolError(f"{where}: native tensor {step.key!r} stacks experts, but its tp rule does not "
                            "say how to place them ({experts: column|row})")
    if rule.dim is None or layout.tp == 1:
        return [None] * len(step.sources)
    world = layout.tp
    if ops not in ((), (Concat(0),)):
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


def _expert_slices(step: Step, rule: SliceRule, rank: int, layout: ParallelLayout, where: str,
                   num_experts: int) -> list[Cut | str]:
    """Experts of other groups SKIP; this group's experts whole, or cut along `rule.dim` over the ranks
    sharing each expert."""
    ops = step.chain.ops
    if len(ops) != 1 or not isinstance(ops[0], Stack) or len(step.sources) != ops[0].parts * num_experts:
        raise RosetoolError(f"{where}: native tensor {step.key!r} has an experts tp rule but is not a stack "
                            f"of the {num_experts} experts")
    mine = layout.experts(rank, num_experts)
    if not mine:
        raise RosetoolError(f"{step.key}: {num_experts} experts cannot be spread over expert_parallel_size="
                            f"{layout.ep} (a rank would hold none)")
    ranks = f"the {layout.etp} ranks sharing each expert ({layout.describe()})"
    out: list[Cut | str] = []
    for i, shape in enumerate(step.trace[0]):
        if i // ops[0].parts not in mine:
            out.append(SKIP)
        elif layout.etp == 1:
            out.append(None)
        else:
            span = Block(shape[rule.dim], 1).span(layout.etp_rank(rank), layout.etp, step.key, ranks)
            out.append((rule.dim, *span))
    return out


def _rank_cuts(writes: list[Step], env: Mapping[str, Any], rank: int, layout: ParallelLayout,
               where: str) -> tuple[dict[str, Cut], set[str]]:
    """What one rank wants of each canonical source of a plan group: its cut, or nothing (skipped)."""
    wanted: dict[str, Cut] = {}
    skipped: set[str] = set()
    num_experts = env.get("num_experts") or 0
    for step in writes:
        rule = parse_rule(step.tp, step.shape, env, step.key)
        for name, cut in zip(step.sources, _source_slices(step, rule, rank, layout, where, num_experts)):
            if cut == SKIP:
                skipped.add(name)
            else:
                wanted[name] = cut
    return wanted, skipped


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


def _read_sources(plan: Plan, ckpt: Checkpoint, step: Step, skipped: set[str]) -> dict[str, torch.Tensor]:
    """The canonical tensors of one source tensor. Of a stack of experts stored raw (a native folder),
    only the rows of the experts this rank keeps are read (its experts are contiguous)."""
    meta = ckpt.tensors[plan.source_keys[step.key]]
    ops = step.chain.ops
    if len(ops) == 1 and isinstance(ops[0], Stack) and getattr(meta, "start", None) is not None \
            and skipped & set(step.sources):
        parts = ops[0].parts
        kept = [i for i, s in enumerate(step.sources) if s not in skipped]
        first, stop = kept[0] // parts, kept[-1] // parts + 1
        names = step.sources[first * parts: stop * parts]
        return dict(zip(names, ops[0].inverse([read_slice(meta, 0, first, stop)], step.trace[0][first * parts:])))
    return dict(zip(step.sources, step.chain.inverse([ckpt.read(plan.source_keys[step.key])], step.trace)))


def shard_state(ckpt: Checkpoint, rank: int, tp: int, ep: int = 1) -> dict[str, torch.Tensor]:
    """Rank `rank`'s native tensors, group by group (one plan group alive at a time)."""
    layout = ParallelLayout(tp, ep)
    plan = make_plan(ckpt, "native", cancel=False)
    env = format_env(ckpt.spec.format("native"), ckpt.config)
    state: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        wanted, skipped = _rank_cuts(group.writes, env, rank, layout, str(ckpt.spec.file))
        direct = _direct_reads(plan, ckpt, group.reads)
        canonical: dict[str, torch.Tensor] = {}
        for name, cut in wanted.items():
            if name in direct and cut is not None:
                canonical[name] = read_slice(direct[name], *cut)
        for step in group.reads:
            if all(s in canonical or s not in wanted for s in step.sources):
                continue
            for name, tensor in _read_sources(plan, ckpt, step, skipped).items():
                if name in wanted and name not in canonical:
                    cut = wanted[name]
                    canonical[name] = tensor if cut is None else tensor.narrow(cut[0], cut[1], cut[2] - cut[1]).clone()
        for step in group.writes:
            (out,) = step.chain.forward([canonical[s] for s in step.sources if s not in skipped])
            state[step.key] = out
        del canonical
    return state


@dataclass(frozen=True)
class TPShard:
    """What the loader needs to build one rank's part of a model instead of the whole."""
    rank: int
    tp: int
    group: Any   # torch.distributed.ProcessGroup of the ranks
    ep: int = 1

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tp, self.ep)

    def state(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        return shard_state(ckpt, self.rank, self.tp, self.ep)

    def make(self, args: ModelArgs):
        from .model import Transformer
        from .tp_layers import parallelize

        return parallelize(Transformer(local_args(args, self.tp, self.ep)), self.rank, self.layout, self.group)
