"""Write Megatron's torch_dist format: one PyTorch distributed checkpoint of global tensors.

Layers are stacked as megatron-core stores them (`decoder.layers.<param>` with a leading
[num_layers] dim), each layer written as its own chunk, so no stacked tensor is ever built: a save
planner hands `torch.distributed.checkpoint` one converted tensor at a time, as the writer asks.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from ...errors import RosetoolError
from ...mappings.spec import expand
from ..execute import execute
from ..plan import Group, Plan, format_env
from ..sinks import DictSink
from ..sources import Checkpoint
from . import keys as K
from .args import CHECKPOINT_VERSION, make_args
from .layout import SINGLE, TRACKER, Layout

METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}
_LAYER = re.compile(r"\.layers\.\d+\.")


def _stacked(key: str) -> str:
    return _LAYER.sub(".layers.", key, count=1)


def _none_bytes() -> io.BytesIO:
    """What megatron-core stores for a local layer's `_extra_state`: the pickled list of the
    object's serialized bytes, and the object is None."""
    inner, outer = io.BytesIO(), io.BytesIO()
    torch.save(None, inner)
    torch.save([inner], outer)
    outer.seek(0)
    return outer


class _ConvertingPlanner(DefaultSavePlanner):
    """Plans every output tensor as a chunk and converts it only when the storage writer asks."""

    def __init__(self, items: list[WriteItem], produce: Callable[[WriteItem], Any]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._produce = items, produce

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        return self._produce(write_item)


def _tensor_item(key: str, dtype: torch.dtype, shape: tuple[int, ...], num_layers: int) -> WriteItem:
    layer = K.layer_of(key)
    props = TensorProperties(dtype=dtype)
    if layer is None:
        zeros = torch.Size([0] * len(shape))
        return WriteItem(index=MetadataIndex(key, zeros), type=WriteItemType.TENSOR,
                         tensor_data=TensorWriteData(ChunkStorageMetadata(zeros, torch.Size(shape)), props,
                                                     torch.Size(shape)))
    offsets = torch.Size([layer] + [0] * len(shape))
    return WriteItem(index=MetadataIndex(_stacked(key), offsets), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, torch.Size([1, *shape])), props,
                                                 torch.Size([num_layers, *shape])))


def write_megatron_dist(ckpt: Checkpoint, plan: Plan, folder: Path, dtype: torch.dtype | None,
                        max_shard_size: int | None, on_tensor: Callable[[int], None] | None, *,
                        layout: Layout = SINGLE, iteration: int | str = "release") -> None:
    cfg, fmt = plan.config, ckpt.spec.format(plan.dst_format)
    if cfg.get("num_experts"):
        raise RosetoolError(f"{ckpt.spec.name}: torch_dist output of mixture-of-experts models is not implemented "
                            f"(megatron-core's sharded expert keys); use --format torch, with --ep as needed")
    env = format_env(fmt, cfg, {"tensor_parallel": layout.tp})
    target = folder / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    target.mkdir()
    out_dtype = plan.outputs[0][1] if plan.outputs else torch.float32
    args = make_args(ckpt.spec, cfg, layout, env["padded_vocab_size"], env["make_vocab_size_divisible_by"],
                     out_dtype, "torch_dist", te=True)
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": 0 if iteration == "release" else int(iteration)}, target / "common.pt")
    (target / "metadata.json").write_text(json.dumps(METADATA))
    items = [_tensor_item(k, d, s, cfg["num_layers"]) for k, d, s in plan.outputs]
    keys = {(i.index.fqn, i.index.offset): k for i, (k, _, _) in zip(items, plan.outputs)}
    extra = [f"{_stacked(expand(t, 0))}._extra_state/shard_{layer}_{cfg['num_layers']}"
             for t in fmt.write.get("extra_state", []) if "{i}" in t for layer in range(cfg["num_layers"])]
    items += [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO) for name in extra]
    groups = {w.key: g for g in plan.groups for w in g.writes}

    def produce(item: WriteItem) -> Any:
        if item.type == WriteItemType.BYTE_IO:
            return _none_bytes()
        key = keys[(item.index.fqn, item.index.offset)]
        tensor = _convert(plan, groups[key], ckpt, dtype)[key]
        if on_tensor:
            on_tensor(tensor.numel() * tensor.element_size())
        return tensor.unsqueeze(0) if item.type == WriteItemType.SHARD else tensor

    writer = dcp.FileSystemWriter(target, single_file_per_rank=True, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=_ConvertingPlanner(items, produce), no_dist=True)
    (folder / TRACKER).write_text(f"{iteration}\n")


def _convert(plan: Plan, group: Group, ckpt: Checkpoint, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sink = DictSink()
    execute(replace(plan, groups=[group]), ckpt, sink, dtype)
    return sink.tensors
