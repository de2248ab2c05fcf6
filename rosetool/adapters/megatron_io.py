"""Megatron LoRA adapters in Megatron-Bridge's layout, as torch-format rank files.

Megatron-Bridge (`megatron.bridge.peft`) wraps each target linear layer (`linear_qkv`, `linear_proj`,
`linear_fc1`, `linear_fc2`) in a `LoRALinear` whose state dict keeps the base's keys and adds the
adapter's under `adapter.`:

    decoder.layers.{i}.self_attention.linear_qkv.adapter.linear_in.weight    A [dim, in]
    decoder.layers.{i}.self_attention.linear_qkv.adapter.linear_out.weight   B [out, dim]

and `ParallelLinearAdapter.forward` scales by `alpha / dim` (no rsLoRA). Under tensor parallelism
(`utils.ParallelLinearAdapter`): for a column-parallel base (linear_qkv, linear_fc1) linear_in is a
ColumnParallelLinear(in, dim) - A is cut on its rank rows - and linear_out a ColumnParallelLinear
cut like the base's rows (fc1's gate/up halves each cut, Bridge's `apply_swiglu_sharded_factory`);
for a row-parallel base (linear_proj, linear_fc2) linear_in is a RowParallelLinear - A cut on its
input columns - and linear_out a ColumnParallelLinear cut on its output rows.

Bridge keeps alpha and dim in its run config. rosetool writes `rosetool_lora.json` beside the rank
files with each tensor's blocks (rank, alpha, r, rsLoRA), because a fused adapter made from separate
HF q/k/v (or gate/up) adapters is A concatenated with B block-diagonal, whose blocks each keep their
own scaling, and with the PEFT config it came from, so exporting gives back the same adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError, RosetoolError
from ..converters.megatron import keys as K
from ..converters.megatron.args import CHECKPOINT_VERSION, make_args
from ..converters.megatron.layout import RANK_FILE, TRACKER, Layout, first_rank_file, iteration_dir, rank_files
from ..converters.megatron.tp import TPRule, parse_rule
from ..converters.megatron.torch_zip import PlannedTensor, TorchZipWriter
from ..converters.megatron.unpickler import index_rank_file
from ..converters.plan import Step, expand_format, format_env
from ..converters.sources import Checkpoint, _load_json
from .lora import Adapter, FusedPair, Pair, Scale, Stored

RECORD = "rosetool_lora.json"
MARKER = "rosetool-megatron-lora"
_IN, _OUT = ".adapter.linear_in.weight", ".adapter.linear_out.weight"


def is_megatron_adapter(path: Path) -> bool:
    return (path / RECORD).is_file()


def adapter_rules(base: TPRule) -> tuple[TPRule, TPRule]:
    """(A's cut, B's cut) for an adapter on a base with rule `base`, as Megatron-Bridge shards them."""
    if base.dim is None:
        return TPRule(), TPRule()
    if base.dim == 0:
        return TPRule(0), base
    return TPRule(1), TPRule(0)


def _names(key: str) -> tuple[str, str]:
    stem = key.removesuffix(".weight")
    return stem + _IN, stem + _OUT


def megatron_steps(base: Checkpoint, fmt_name: str, tp: int) -> tuple[list[Step], dict[str, Any]]:
    spec = base.spec
    fmt = spec.format(fmt_name)
    params = {"tensor_parallel": tp}
    return expand_format(spec, fmt, base.config, params), format_env(fmt, base.config, params)


def write_megatron_adapter(folder: Path, base: Checkpoint, fused: dict[str, FusedPair], fmt_name: str,
                           layout: Layout, peft_config: dict[str, Any] | None) -> int:
    """Rank files holding only adapter tensors (Bridge's names and cuts), the tracker, and the record."""
    if layout.ep > 1:
        raise RosetoolError("--adapters-only writes attention and dense MLP adapters; --ep does not apply")
    cfg, spec = base.config, base.spec
    steps, env = megatron_steps(base, fmt_name, layout.tp)
    by_key = {s.key: s for s in steps}
    cuts: dict[str, tuple[TPRule, torch.Tensor]] = {}
    for key, pair in fused.items():
        rule_a, rule_b = adapter_rules(parse_rule(by_key[key].tp, env))
        rule_b.check(layout.tp, key)
        name_a, name_b = _names(key)
        for name, rule, t in ((name_a, rule_a, pair.a), (name_b, rule_b, pair.b)):
            if not rule.fits(tuple(t.shape), layout.tp):
                raise RosetoolError(f"{name}: shape {list(t.shape)} cannot be split over TP={layout.tp} "
                                    f"(a fused adapter's rank is the sum of its parts' ranks)")
            cuts[name] = (rule, t)
    stages = layout.stage_layers(cfg["num_layers"])
    dtype = next(iter(fused.values())).a.dtype if fused else torch.float32
    args = make_args(spec, cfg, layout, env["padded_vocab_size"], env["make_vocab_size_divisible_by"], dtype,
                     "torch", te=fmt_name == "megatron_te", where=base.path)
    header = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    (folder / TRACKER).write_text("release\n")
    for stage, layers in enumerate(stages):
        mine = {n: c for n, c in cuts.items() if K.layer_of(n) in layers}
        for tp in range(layout.tp):
            shards = {K.renumber(n, -layers.start): rule.split(t, layout.tp)[tp].contiguous()
                      for n, (rule, t) in mine.items()}
            planned = {n: PlannedTensor(s.dtype, tuple(s.shape)) for n, s in shards.items()}
            path = folder / "release" / layout.rank_dir(tp, stage) / RANK_FILE
            path.parent.mkdir(parents=True)
            writer = TorchZipWriter(path, {**header, "model": planned})
            try:
                for n, s in shards.items():
                    writer.write(planned[n], s)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    record = {"format": MARKER, "version": 1, "layout": fmt_name,
              "modules": {k: [{"rank": n, "alpha": s.alpha, "r": s.rank, "rslora": s.rslora} for n, s in p.blocks]
                          for k, p in sorted(fused.items())},
              "peft_config": peft_config}
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return 2 * len(fused)


def _blocks(raw: Any, where: Path, key: str) -> list[tuple[int, Scale]]:
    try:
        return [(int(b["rank"]), Scale(b["alpha"], int(b["r"]), bool(b["rslora"]))) for b in raw]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{where}: modules[{key!r}] must be a list of {{rank, alpha, r, rslora}}") from None


def _bridge_scale(folder: Path) -> Scale | None:
    """alpha and dim from a Megatron-Bridge run_config.yaml's `peft:` section (read as data)."""
    for path in (folder / "run_config.yaml", iteration_dir(folder)[0] / "run_config.yaml"):
        if path.is_file():
            peft = (yaml.safe_load(path.read_text()) or {}).get("peft") or {}
            if "dim" in peft and "alpha" in peft:
                return Scale(peft["alpha"], int(peft["dim"]))
    return None


def read_megatron_adapter(folder: Path, base: Checkpoint) -> Adapter:
    """Global A and B per adapted Megatron weight (TP shards merged, PP stages renumbered), split into
    the blocks the record lists."""
    record = _load_json(folder / RECORD)
    if record.get("format") != MARKER or not isinstance(record.get("modules"), dict):
        raise CheckpointError(f"{folder / RECORD}: not a {MARKER} record")
    iteration, _ = iteration_dir(folder)
    first_file = first_rank_file(iteration)
    args = index_rank_file(first_file).get("args")
    if args is None:
        raise CheckpointError(f"{first_file}: no 'args' saved; rosetool needs them for the layout")
    layout = Layout(getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1))
    per_stage = base.config["num_layers"] // layout.pp
    fmt_name = record.get("layout", "megatron")
    steps, env = megatron_steps(base, fmt_name, layout.tp)
    by_key = {s.key: s for s in steps}
    shards: dict[str, list] = {}
    for (tp, stage, _), path in sorted(rank_files(iteration, layout).items()):
        blob = index_rank_file(path)
        for local, t in K.tensors_of(blob.get("model") or {}).items():
            if not local.endswith((_IN, _OUT)):
                raise CheckpointError(f"{path}: unexpected tensor {local!r} in an adapter checkpoint "
                                      f"(only *{_IN} and *{_OUT})")
            shards.setdefault(K.renumber(local, stage * per_stage), []).append((path, t))
    fallback = _bridge_scale(folder)
    pairs: dict[str, list[Pair]] = {}
    for name in sorted(n for n in shards if n.endswith(_IN)):
        key = name.removesuffix(_IN) + ".weight"
        out_name = name.removesuffix(_IN) + _OUT
        if out_name not in shards:
            raise CheckpointError(f"{shards[name][0][0]}: tensor {name!r} has no {out_name.rsplit('.', 3)[-3]}"
                                  f".linear_out")
        if key not in by_key:
            raise CheckpointError(f"{shards[name][0][0]}: tensor {name!r} adapts {key!r}, which the base "
                                  f"{base.path} ({base.spec.name}) does not have")
        rule_a, rule_b = adapter_rules(parse_rule(by_key[key].tp, env))
        a, b = (_merged(n, shards[n], rule, layout.tp) for n, rule in ((name, rule_a), (out_name, rule_b)))
        raw = record["modules"].get(key)
        blocks = _blocks(raw, folder / RECORD, key) if raw is not None else \
            [(a.shape[0], fallback)] if fallback else None
        if blocks is None:
            raise CheckpointError(f"{folder / RECORD}: no scaling for {key!r} (modules lists it not)")
        if sum(n for n, _ in blocks) != a.shape[0]:
            raise CheckpointError(f"{a.file}: rank mismatch: tensor {name!r} has rank {a.shape[0]}, {RECORD} "
                                  f"lists blocks of {[n for n, _ in blocks]}")
        pairs[key], start = [], 0
        for n, scale in blocks:
            pairs[key].append(Pair(_narrow(a, 0, start, n), _narrow(b, 1, start, n), scale))
            start += n
    orphans = sorted(n for n in shards if n.endswith(_OUT) and n.removesuffix(_OUT) + _IN not in shards)
    if orphans:
        raise CheckpointError(f"{shards[orphans[0]][0][0]}: tensor {orphans[0]!r} has no linear_in")
    return Adapter(folder, fmt_name, pairs, peft_config=record.get("peft_config"))


def _merged(name: str, parts: list, rule: TPRule, tp: int) -> Stored:
    if len(parts) != tp:
        raise CheckpointError(f"{parts[0][0]}: tensor {name!r} is in {len(parts)} rank files, TP={tp}")
    shape = list(parts[0][1].shape)
    if rule.dim is not None:
        shape[rule.dim] *= tp
    return Stored(name, parts[0][0], tuple(shape), lambda: rule.merge([t.load() for _, t in parts]))


def _narrow(x: Stored, dim: int, start: int, n: int) -> Stored:
    shape = list(x.shape)
    if shape[dim] == n:
        return x
    shape[dim] = n
    return Stored(x.name, x.file, tuple(shape), lambda: x.load().narrow(dim, start, n).contiguous())
