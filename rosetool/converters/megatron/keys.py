"""Key spellings: nested legacy state dicts, older names, stage-local vs global layer numbers."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any

import torch

from .unpickler import LazyTensor

_LAYER = re.compile(r"(\.layers\.)(\d+)(\.)")
# SequentialMLP `experts.local_experts.3.linear_fc1.weight`, TEGroupedMLP `experts.linear_fc1.weight3`
_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)|(\.experts\.linear_fc[12]\.weight)(\d+)()$")
# Older legacy spellings -> checkpoint_version 3.0 spellings (applied to `language_model.*` keys only).
_LEGACY_ALIASES = [
    (re.compile(r"^language_model\.transformer\."), "language_model.encoder."),
    (re.compile(r"(\.layers\.\d+)\.attention\."), r"\1.self_attention."),
    (re.compile(r"\.input_layernorm\."), ".input_norm."),
    (re.compile(r"\.post_attention_layernorm\."), ".post_attention_norm."),
    (re.compile(r"\.final_layernorm\."), ".final_norm."),
]
# torch_dist keys every expert of a layer as one tensor (`experts.experts.*`), checked before the TE marker
# that the same checkpoints carry.
# torch_dist holds every expert of a layer in one tensor, by global expert number; rosetool names expert e's
# slice of it `...weight{e}` (the TE grouped spelling), so specs address experts one by one.
DIST_EXPERTS = re.compile(r"\.experts\.experts\.linear_fc[12]\.weight(\d*)$")
# key layout -> format, first match that the architecture has wins; a tuple needs all its parts: megatron-core's
# local-spec MLA in torch_dist, and a Transformer Engine MoE layer's own pre-MLP norm (the local spec keys it as
# `mlp.linear_fc1.layer_norm_weight`; DeepSeek's TE layout has it too and no `megatron_dist_te`)
FORMAT_MARKERS = [("language_model.", "megatron_legacy"), ((".experts.experts.", ".kv_layernorm."), "megatron_dist_local"),
                  ((".experts.experts.", ".pre_mlp_layernorm."), "megatron_dist_te"),
                  (".experts.experts.", "megatron_dist"), (".linear_qkv.layer_norm_weight", "megatron_te"),
                  (".linear_kv_up_proj.layer_norm_weight", "megatron_te")]


def flatten(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts (the legacy model) -> dotted keys; tensors and other leaves as they are."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], state


def tensors_of(state: Any) -> dict[str, torch.Tensor | LazyTensor]:
    """Model tensors under today's spellings; `_extra_state` (None or TE's FP8 metadata) is dropped."""
    out = {}
    for key, value in flatten(state):
        if isinstance(value, (torch.Tensor, LazyTensor)) and not key.endswith("._extra_state"):
            out[normalize(key)] = value
    return out


def normalize(key: str) -> str:
    if not key.startswith("language_model."):
        return key
    for pattern, repl in _LEGACY_ALIASES:
        key = pattern.sub(repl, key)
    return key


def detect_format(keys: list[str], formats: Collection[str] | None = None) -> str:
    for marker, name in FORMAT_MARKERS:
        if (formats is None or name in formats) and all(any(part in k for k in keys) for part in ((marker,) if isinstance(marker, str) else marker)):
            return name
    return "megatron"


def layer_of(key: str) -> int | None:
    m = _LAYER.search(key)
    return int(m.group(2)) if m else None


def renumber(key: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}", key, count=1)


def expert_of(key: str) -> int | None:
    m = _EXPERT.search(key)
    return None if m is None else int(m.group(2) or m.group(5))


def renumber_expert(key: str, offset: int) -> str:
    def sub(m: re.Match[str]) -> str:
        head, num, tail = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), "")
        return f"{head}{int(num) + offset}{tail}"
    return _EXPERT.sub(sub, key, count=1)


def expert_layouts(keys: list[str]) -> set[str]:
    """Which expert layouts keys use; a checkpoint must use one."""
    return {"local_experts" if m.group(2) else "grouped" for k in keys if (m := _EXPERT.search(k))}


def nest_legacy(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat legacy keys -> the nesting Megatron's legacy modules save and load: language_model ->
    embedding -> word_embeddings -> weight, but encoder -> 'layers.0.input_norm.weight' (flat)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        depth = {"embedding": 3, "encoder": 2, "output_layer": 2}.get(parts[1], 1) if len(parts) > 2 else 1
        node = out
        for p in parts[:depth]:
            node = node.setdefault(p, {})
        node[".".join(parts[depth:])] = value
    return out
