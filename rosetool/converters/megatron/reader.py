"""Open a Megatron torch-format checkpoint as one *global* checkpoint.

Every TP shard of a tensor is checked against the shape the spec plans for it, so a missing rank or a
shard that does not fit the declared TP fails at open, naming the rank file and tensor. Reading a key
merges its shards (per the entry's `tp:` rule) from memory-mapped rank files, one tensor at a time.
With expert parallelism every EP rank's experts are gathered under their global numbers, and an
expert one EP rank lacks fails at open too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...mappings.spec import ArchSpec, Format
from ..config_map import read_config
from ..counts import check_layer_count
from ..plan import check_source_counts, expand_format, format_env
from ..sources import Checkpoint
from . import keys as K
from .args import config_from_args, spec_for_args, summary
from .layout import Layout, first_rank_file, iteration_dir, rank_files
from .tp import TPRule, parse_rule
from .unpickler import LazyTensor, index_rank_file


@dataclass(frozen=True)
class ShardedTensor:
    """A global tensor as `plan` sees it, plus where its shards live."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    stage: int
    local: str
    rule: TPRule
    ep: int = 0


def _model_state(blob: dict[str, Any], path: Path) -> dict[str, LazyTensor]:
    if "model" not in blob:
        extra = "virtual pipeline stages (model0, model1, ...) are not supported" if "model0" in blob else \
            "no 'model' entry"
        raise CheckpointError(f"{path}: {extra}")
    return K.tensors_of(blob["model"])


def _global_keys(states: dict[tuple[int, int, int], dict[str, LazyTensor]], files: dict[tuple[int, int, int], Path],
                 layout: Layout, per_rank: int) -> dict[str, tuple[int, int, str]]:
    """Global key -> (stage, EP rank, local key); stages number their layers from 0, in order, EP ranks
    their experts. Every EP rank must hold the same local experts."""
    out, offset = {}, 0
    for s in range(layout.pp):
        first = states[(0, s, 0)]
        layers = {K.layer_of(k) for k in first} - {None}
        experts = sorted(k for k in first if K.expert_of(k) is not None)
        for ep in range(layout.ep):
            state = states[(0, s, ep)]
            missing = [k for k in experts if k not in state]
            if missing:
                raise CheckpointError(f"{files[(0, s, ep)]}: tensor {missing[0]!r} is missing (EP rank 0 has it; "
                                      f"{len(missing)} missing in all)")
            for k in state if ep else first:
                if ep and K.expert_of(k) is None:
                    continue
                g = K.renumber(k, offset)
                out.setdefault(K.renumber_expert(g, ep * per_rank) if K.expert_of(k) is not None else g, (s, ep, k))
        offset += max(layers) + 1 if layers else 0
    return out


def _one_expert_layout(states: dict[tuple[int, int, int], dict[str, LazyTensor]],
                       files: dict[tuple[int, int, int], Path]) -> None:
    seen: dict[str, tuple[Path, str]] = {}
    for rank, state in states.items():
        for k in state:
            for kind in K.expert_layouts([k]):
                seen.setdefault(kind, (files[rank], k))
    if len(seen) > 1:
        (f1, k1), (f2, k2) = seen.values()
        raise CheckpointError(f"{f2}: tensor {k2!r} mixes expert layouts with {k1!r} in {f1} "
                              f"(SequentialMLP local_experts vs grouped GEMM)")


def _legacy_qkv(t: torch.Tensor, version: float, head_dim: int) -> torch.Tensor:
    """checkpoint_version < 2.0 ordered QKV rows per TP partition as [3, heads, d] (0) or [heads, d, 3] (1.0)."""
    rest = t.shape[1:]
    heads = t.shape[0] // (3 * head_dim)
    if version < 1.0:
        return t.view(3, heads, head_dim, *rest).transpose(0, 1).reshape(t.shape)
    return t.view(heads, head_dim, 3, *rest).transpose(1, 2).reshape(t.shape)


@dataclass
class _Shards:
    files: dict[tuple[int, int], Path]
    states: dict[tuple[int, int], dict[str, LazyTensor]]
    layout: Layout
    version: float
    head_dim: int

    def get(self, meta: ShardedTensor) -> torch.Tensor:
        shards = [self.states[(t, meta.stage, meta.ep)][meta.local].load() for t in range(self.layout.tp)]
        if self.version < 2.0 and ".query_key_value." in meta.name:
            shards = [_legacy_qkv(s, self.version, self.head_dim) for s in shards]
        return meta.rule.merge(shards)

    def check(self, meta: ShardedTensor, shard_shape: tuple[int, ...]) -> None:
        for t in range(self.layout.tp):
            state, path = self.states[(t, meta.stage, meta.ep)], self.files[(t, meta.stage, meta.ep)]
            if meta.local not in state:
                raise CheckpointError(f"{path}: tensor {meta.local!r} is missing (TP rank 0 has it)")
            got = tuple(state[meta.local].shape)
            if got != shard_shape:
                raise CheckpointError(f"{path}: tensor {meta.local!r} has shape {list(got)}, expected "
                                      f"{list(shard_shape)} (global {list(meta.shape)} split for TP={self.layout.tp})")


def open_megatron_torch(root: Path, vocab_size: int | None = None) -> Checkpoint:
    folder, iteration = iteration_dir(root)
    first = index_rank_file(first_rank_file(folder))
    args = first.get("args")
    if args is None:
        raise CheckpointError(f"{first_rank_file(folder)}: no 'args' saved; rosetool needs them for the model shape")
    layout = Layout(getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1),
                    getattr(args, "expert_model_parallel_size", 1) or 1)
    files = rank_files(folder, layout)
    states = {r: _model_state(index_rank_file(f) if r != (0, 0, 0) else first, f) for r, f in files.items()}
    _one_expert_layout(states, files)
    num_experts = getattr(args, "num_experts", None) or 0
    per_rank = layout.experts_per_rank(num_experts) if num_experts else 0
    index = _global_keys(states, files, layout, per_rank)
    fmt_name = K.detect_format(list(index))
    where = str(files[(0, 0, 0)])
    check_layer_count(getattr(args, "num_layers", None), len(index), where)
    spec = spec_for_args(args, where)
    config = read_config(spec, spec.format(fmt_name), config_from_args(args, vocab_size), where)
    params = {"padded_vocab_size": getattr(args, "padded_vocab_size", config["vocab_size"]),
              "tensor_parallel": layout.tp}
    shards = _Shards(files, states, layout, float(first.get("checkpoint_version", 0)), config["head_dim"])
    metas = _metas(spec.format(fmt_name), spec, config, params, index, shards)
    info = {"params": params, "iteration": iteration,
            "megatron": {"format": "torch", "layout": fmt_name, "tp": layout.tp, "pp": layout.pp, "ep": layout.ep,
                         "checkpoint_version": first.get("checkpoint_version"), "args": summary(args)},
            "ranks": {str(f.relative_to(root)): {k: list(v.shape) for k, v in states[r].items()}
                      for r, f in sorted(files.items(), key=lambda x: (x[0][1], x[0][2], x[0][0]))}}
    raw = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return Checkpoint(root, fmt_name, spec, raw, config, metas, lambda k: shards.get(metas[k]), [], info)


def _metas(fmt: Format, spec: ArchSpec, config: dict[str, Any], params: dict[str, Any],
           index: dict[str, tuple[int, int, str]], shards: _Shards) -> dict[str, ShardedTensor]:
    """Global tensors with the shape the spec plans (so `plan` checks them), every shard checked."""
    env = format_env(fmt, config, params)
    check_source_counts(spec, fmt, config, params, {k: shards.states[(0, s, ep)][local] for k, (s, ep, local)
                                                   in index.items()}, shards.files[(0, 0, 0)])
    steps = {s.key: s for s in expand_format(spec, fmt, config, params)}
    tp = shards.layout.tp
    metas = {}
    for key, (stage, ep, local) in index.items():
        tensor = shards.states[(0, stage, ep)][local]
        step = steps.get(key)
        rule = parse_rule(step.tp, env) if step else TPRule()
        shape = step.shape if step and rule.fits(step.shape, tp) else _merged_shape(tensor, rule, tp)
        meta = ShardedTensor(key, tensor.dtype, tuple(shape), shards.files[(0, stage, ep)], stage, local, rule, ep)
        shards.check(meta, rule.shard_shape(meta.shape, tp))
        metas[key] = meta
    return metas


def _merged_shape(tensor: LazyTensor, rule: TPRule, tp: int) -> tuple[int, ...]:
    shape = list(tensor.shape)
    if rule.dim is not None:
        shape[rule.dim] *= tp
    return tuple(shape)
