"""Write a plan's global tensors as Megatron torch-format rank files.

Each source tensor is read and converted once per PP stage, and its TP shards are fanned out to every
(TP rank, EP rank) file of that stage at once. Those files are streamed (`torch_zip`): the pickle is
made from the plan before any tensor exists, and each shard's bytes go to disk as they are cut, so
peak memory is one global tensor and its shards, whatever the model's size.
Expert keys are planned with global expert numbers; EP rank k keeps experts k*E/EP .. (k+1)*E/EP - 1,
renumbered from 0, and every EP rank holds the rest of its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ...errors import RosetoolError
from ...mappings.spec import expand
from ..execute import execute
from ..plan import Group, Plan, format_env
from ..sources import Checkpoint
from . import keys as K
from .args import CHECKPOINT_VERSION, make_args
from .layout import RANK_FILE, SINGLE, TRACKER, Layout
from .tp import TPRule, parse_rule
from .torch_zip import PlannedTensor, TorchZipWriter


@dataclass
class _Rank:
    """One rank file of the stage being written: its open stream, and global key -> the placeholder(s)
    its shard fills (a tied embedding is also the last stage's head)."""
    writer: TorchZipWriter
    slots: dict[str, PlannedTensor]


@dataclass
class _FanOutSink:
    """Cuts each global tensor into its TP shards once and hands each rank file the shard it holds."""
    rules: dict[str, TPRule]
    ranks: dict[tuple[int, int], _Rank]     # (EP rank, TP rank) -> file
    tp: int
    on_tensor: Callable[[int], None] | None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        holders = [(tp, r) for (_, tp), r in self.ranks.items() if key in r.slots]
        shards = self.rules[key].split(tensor, self.tp) if holders else []
        for tp, rank in holders:
            rank.writer.write(rank.slots[key], shards[tp])
        if self.on_tensor:
            self.on_tensor(tensor.numel() * tensor.element_size())


@dataclass(frozen=True)
class _Stages:
    layers: list[range]

    def of(self, key: str) -> int:
        layer = K.layer_of(key)
        if layer is None:
            return 0 if "embedding" in key else len(self.layers) - 1
        return next(s for s, r in enumerate(self.layers) if layer in r)

    def local(self, key: str) -> str:
        return K.renumber(key, -self.layers[self.of(key)].start)


def write_megatron(ckpt: Checkpoint, plan: Plan, folder: Path, dtype: torch.dtype | None,
                   max_shard_size: int | None, on_tensor: Callable[[int], None] | None, *,
                   layout: Layout = SINGLE, iteration: int | str = "release") -> None:
    cfg, fmt = plan.config, ckpt.spec.format(plan.dst_format)
    env = format_env(fmt, cfg, {"tensor_parallel": layout.tp})
    rules = {w.key: parse_rule(w.tp, env) for g in plan.groups for w in g.writes}
    outputs = {k: (d, s) for k, d, s in plan.outputs}
    for key, rule in rules.items():
        rule.check(layout.tp, key)
        if not rule.fits(outputs[key][1], layout.tp):
            raise RosetoolError(f"{key}: shape {list(outputs[key][1])} cannot be split over TP={layout.tp}")
    stages = _Stages(layout.stage_layers(cfg["num_layers"]))
    out_dtype = plan.outputs[0][1] if plan.outputs else torch.float32
    args = make_args(ckpt.spec, cfg, layout, env["padded_vocab_size"], env["make_vocab_size_divisible_by"],
                     out_dtype, "torch", legacy=plan.dst_format == "megatron_legacy",
                     te=plan.dst_format == "megatron_te", where=ckpt.path)
    folder_name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    (folder / TRACKER).write_text(f"{iteration}\n")
    header = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
              "iteration": 0 if iteration == "release" else int(iteration)}
    num_experts = cfg.get("num_experts") or 0
    if layout.ep > 1 and not num_experts:
        raise RosetoolError(f"EP={layout.ep} needs a mixture-of-experts model; {ckpt.spec.name} has no experts")
    per_rank = layout.experts_per_rank(num_experts) if num_experts else 0
    for stage in range(layout.pp):
        ranks: dict[tuple[int, int], _Rank] = {}
        stage_groups: dict[int, Group] = {}
        try:
            for ep in range(layout.ep):
                experts = range(ep * per_rank, (ep + 1) * per_rank)
                groups, local = _stage_groups(plan, stages, stage, fmt.write.get("tied_head"), cfg, experts)
                stage_groups.update((id(g), g) for g in groups)
                extra = _extra_state(fmt.write.get("extra_state", []), stages, stage, groups, local, num_experts)
                for tp in range(layout.tp):
                    slots, model = {}, dict(extra)
                    for g in groups:
                        for w in g.writes:
                            names = local(w.key)
                            if names:
                                slots[w.key] = PlannedTensor(outputs[w.key][0],
                                                             rules[w.key].shard_shape(outputs[w.key][1], layout.tp))
                                model.update((name, slots[w.key]) for name in names)
                    if plan.dst_format == "megatron_legacy":
                        model = K.nest_legacy(model)
                    path = folder / folder_name / layout.rank_dir(tp, stage, ep) / RANK_FILE
                    path.parent.mkdir(parents=True)
                    ranks[(ep, tp)] = _Rank(TorchZipWriter(path, {**header, "model": model}), slots)
            groups = [g for g in plan.groups if id(g) in stage_groups]    # plan order
            execute(replace(plan, groups=groups), ckpt, _FanOutSink(rules, ranks, layout.tp, on_tensor), dtype)
            for rank in ranks.values():
                rank.writer.close()
        except BaseException:
            for rank in ranks.values():
                rank.writer.abort()
            raise


def _stage_groups(plan: Plan, stages: _Stages, stage: int, tied_head: str | None,
                  cfg: dict[str, Any], experts: range) -> tuple[list[Group], Callable[[str], list[str]]]:
    """The stage's groups, and global key -> local key(s); an expert outside this EP rank's `experts`
    has none. A tied embedding is also written as the last stage's head (Megatron keeps that copy
    when PP > 1)."""
    last = len(stages.layers) - 1
    tied_copy = cfg["tie_word_embeddings"] and tied_head and last > 0 and stage == last

    def local(key: str) -> list[str]:
        expert = K.expert_of(key)
        if expert is not None:
            if expert not in experts:
                return []
            key = K.renumber_expert(key, -experts.start)
        if stages.of(key) == stage:
            return [stages.local(key)]
        return [tied_head] if tied_copy and "word_embeddings" in key else []

    groups = [g for g in plan.groups if any(local(w.key) for w in g.writes)]
    return groups, local


def _extra_state(templates: list[str], stages: _Stages, stage: int, groups: list[Group],
                 local: Callable[[str], list[str]], num_experts: int) -> dict[str, None]:
    """`_extra_state` entries mcore modules expect (None for local layers; TE fills its own). A
    per-layer module gets one only in layers that have its weights (dense and MoE layers differ)."""
    written = {k for g in groups for w in g.writes for k in local(w.key)}
    out = {}
    for t in templates:
        for layer in stages.layers[stage] if "{i}" in t else [None]:
            for expert in range(num_experts) if "{e}" in t else [None]:
                names = local(expand(t, layer, expert) + ".weight")
                name = names[0].removesuffix(".weight") if names else None
                if name and (layer is None or any(k.startswith(name + ".") for k in written)):
                    out[name + "._extra_state"] = None
    return out
