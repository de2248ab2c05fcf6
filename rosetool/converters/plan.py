"""Spec + config + source headers -> a plan: which format tensors to read, which to write, in groups.

Every tensor's shape is known before any data moves (shape arithmetic per op), so bad inputs fail
before a byte is written and the writer can lay out its files up front. Tensors are grouped by the
canonical tensors they share (a fused QKV read feeds three canonical tensors that feed one fused
write), so the executor holds one group at a time and memory stays bounded.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, RosetoolError
from ..mappings import expr
from ..mappings.ops import Chain, Shapes, build_op
from ..mappings.spec import ArchSpec, Format, expand, is_layered, is_per_expert
from .counts import check_counts
from .sources import Checkpoint
from .weight_dtypes import check_weight_dtypes


@dataclass(frozen=True)
class Step:
    """One format tensor and how it relates to canonical tensors."""
    key: str
    sources: tuple[str, ...]
    chain: Chain
    trace: list[Shapes]
    tp: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.trace[-1][0])


@dataclass
class Group:
    reads: list[Step] = field(default_factory=list)
    writes: list[Step] = field(default_factory=list)


@dataclass
class Plan:
    spec: ArchSpec
    config: dict[str, Any]
    dst_format: str
    groups: list[Group]
    source_keys: dict[str, str]           # planned key -> key as stored in the source
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    # written key -> the stored parts (codes, scales) copied as they are (a quantized source kept as is)
    stored: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    quantization_config: dict[str, Any] | None = None   # for the written config.json, when quantized

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.outputs)


def format_env(fmt: Format, config: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config + format params; a given param replaces the spec's before later params use it
    (Megatron's padded vocabulary depends on the TP size given)."""
    env, given = dict(config), dict(params or {})
    for k, v in fmt.params.items():
        env[k] = given[k] if k in given else expr.evaluate(v, env)
    env.update(given)
    return env


def _layers(template: str, config: Mapping[str, Any]) -> list[int | None]:
    return list(range(config["num_layers"])) if is_layered(template) else [None]


def _experts(template: str, config: Mapping[str, Any]) -> list[int | None]:
    return list(range(config.get("num_experts") or 0)) if is_per_expert(template) else [None]


def _instances(template: str, config: Mapping[str, Any]) -> list[tuple[int | None, int | None]]:
    """(layer, expert) for each concrete key a template stands for."""
    return [(i, e) for i in _layers(template, config) for e in _experts(template, config)]


def _expand_sources(sources: tuple[str, ...], layer: int | None, expert: int | None,
                    config: Mapping[str, Any]) -> tuple[str, ...]:
    """A key without `{e}` made from per-expert tensors takes every expert's, expert-major."""
    if expert is not None or not any(is_per_expert(s) for s in sources):
        return tuple(expand(s, layer, expert) for s in sources)
    return tuple(expand(s, layer, e) for e in range(config.get("num_experts") or 0) for s in sources)


def canonical_shapes(spec: ArchSpec, config: Mapping[str, Any]) -> dict[str, torch.Size]:
    out = {}
    for t in spec.tensors:
        for layer, expert in _instances(t.name, config):
            if t.when is not None and not expr.evaluate(t.when, {**config, "i": layer}):
                continue
            out[expand(t.name, layer, expert)] = torch.Size(int(expr.evaluate(d, config)) for d in t.shape)
    return out


def expand_format(spec: ArchSpec, fmt: Format, config: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> list[Step]:
    """Concrete steps of one format; entries whose canonical tensors are absent (tied head) drop out."""
    shapes = canonical_shapes(spec, config)
    env = format_env(fmt, config, params)
    steps = []
    for e in fmt.entries:
        chain = Chain(tuple(build_op(op, env) for op in e.ops))
        for layer, expert in _instances(e.key, config):
            if e.when is not None and not expr.evaluate(e.when, {**env, "i": layer}):
                continue
            sources = _expand_sources(e.sources, layer, expert, config)
            if not sources or not all(s in shapes for s in sources):
                continue
            try:
                trace = chain.trace([shapes[s] for s in sources])
            except (RuntimeError, ValueError) as exc:
                raise RosetoolError(f"{spec.file}: formats.{fmt.name} entry {e.key!r}: ops do not fit the "
                                    f"config ({str(exc).splitlines()[0]})") from None
            steps.append(Step(expand(e.key, layer, expert), sources, chain, trace, e.tp))
    return steps


def ignored_keys(fmt: Format, config: Mapping[str, Any]) -> set[str]:
    env = format_env(fmt, config)
    out = set()
    for rule in fmt.ignore:
        if rule.get("when") is None or expr.evaluate(rule["when"], env):
            out.update(expand(rule["key"], layer, expert) for layer, expert in _instances(rule["key"], config))
    return out


def _stored_key(key: str, present: Mapping[str, Any], prefixes: tuple[str, ...]) -> str | None:
    if key in present:
        return key
    for p in prefixes:
        if key.startswith(p) and key[len(p):] in present:
            return key[len(p):]
    return None


def match_source(ckpt: Checkpoint, fmt: Format, steps: list[Step]) -> dict[str, str]:
    """Check the source holds exactly the planned tensors with the planned shapes."""
    where = ckpt.path
    found: dict[str, str] = {}
    for s in steps:
        key = _stored_key(s.key, ckpt.tensors, fmt.key_prefixes)
        if key is None:
            raise CheckpointError(f"{where}: missing tensor {s.key!r} (expected for {ckpt.spec.name})")
        got = tuple(ckpt.tensors[key].shape)
        if got != s.shape:
            raise CheckpointError(f"{ckpt.tensors[key].file}: tensor {key!r} has shape {list(got)}, "
                                  f"config implies {list(s.shape)}")
        found[s.key] = key
    ignored = {_stored_key(k, ckpt.tensors, fmt.key_prefixes) for k in ignored_keys(fmt, ckpt.config)}
    extra = sorted(set(ckpt.tensors) - set(found.values()) - ignored)
    for rule in fmt.unexpected:
        prefix = rule["prefix"].format(**ckpt.config)
        known = [k for k in extra if k.startswith(prefix)]
        if known:
            raise CheckpointError(f"{ckpt.tensors[known[0]].file}: tensor {known[0]!r} ({len(known)} under "
                                  f"{prefix}*) is {rule['message']}")
    if extra:
        raise CheckpointError(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} unexpected in all) for {ckpt.spec.name}")
    return found


def _group(reads: list[Step], writes: list[Step]) -> list[Group]:
    """Union-find over canonical names; groups come out in the order of the first write."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for step in reads + writes:
        for s in step.sources[1:]:
            parent[find(s)] = find(step.sources[0])
    groups: dict[str, Group] = {}
    for step in writes:
        groups.setdefault(find(step.sources[0]), Group()).writes.append(step)
    for step in reads:
        root = find(step.sources[0])
        if root in groups:
            groups[root].reads.append(step)
    return list(groups.values())


def cancel_equal_chains(reads: list[Step], writes: list[Step]) -> tuple[list[Step], list[Step]]:
    """A write with the same sources and ops as a read is that read's tensor as stored (HF -> HF,
    Megatron -> Megatron): plan it as an identity copy through a canonical alias, so the executor can
    move its bytes in the kernel instead of undoing and redoing every op. Reads no group needs any
    more drop out in `_group`."""
    by_chain = {(r.sources, r.chain): r for r in reads}
    aliases: list[Step] = []
    out: list[Step] = []
    for w in writes:
        r = by_chain.get((w.sources, w.chain))
        if r is None:
            out.append(w)
            continue
        alias = (f"={r.key}",)
        identity = Chain(())
        trace = identity.trace([r.shape])
        aliases.append(Step(r.key, alias, identity, trace, r.tp))
        out.append(Step(w.key, alias, identity, trace, w.tp))
    return reads + aliases, out


def check_source_counts(spec: ArchSpec, fmt: Format, config: Mapping[str, Any], params: Mapping[str, Any] | None,
                        stored: Mapping[str, Any], where: str | Path) -> None:
    """Layer and expert counts against the tensors a source holds (`stored`: key -> anything with a
    `.shape`), before a plan is expanded from them (see counts.py)."""
    def find(key: str) -> tuple[int, ...] | None:
        hit = _stored_key(key, stored, fmt.key_prefixes)
        return None if hit is None else tuple(stored[hit].shape)
    check_counts(spec, fmt, config, format_env(fmt, config, params), find, str(where))


def make_plan(ckpt: Checkpoint, dst_format: str, dtype: torch.dtype | None = None,
              dst_params: Mapping[str, Any] | None = None, cancel: bool = True) -> Plan:
    """`cancel=False` keeps every write expressed over canonical tensors (a tensor-parallel rank slices
    those), instead of copying same-layout tensors through as stored."""
    spec, config = ckpt.spec, ckpt.config
    src_fmt = spec.format(ckpt.format)
    check_source_counts(spec, src_fmt, config, ckpt.info.get("params"), ckpt.tensors, ckpt.path)
    reads = expand_format(spec, src_fmt, config, ckpt.info.get("params"))
    source_keys = match_source(ckpt, src_fmt, reads)
    check_weight_dtypes(ckpt.tensors, source_keys.values(), ckpt.raw_config, spec.name)
    writes = expand_format(spec, spec.format(dst_format), config, dst_params)
    groups = _group(*cancel_equal_chains(reads, writes)) if cancel else _group(reads, writes)
    outputs = []
    for g in groups:
        src_dtype = ckpt.tensors[source_keys[g.reads[0].key]].dtype
        outputs += [(w.key, dtype or src_dtype, w.shape) for w in g.writes]
    return Plan(spec, config, dst_format, groups, source_keys, outputs)
