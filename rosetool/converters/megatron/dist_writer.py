"""Write Megatron's torch_dist format: one PyTorch distributed checkpoint of global tensors.

Layers are stacked as megatron-core stores them (`decoder.layers.<param>` with a leading
[num_layers] dim; per layer instead when dense and MoE layers mix), and an MoE layer's experts as one
[num_experts, ...] tensor. Each layer's (and expert's) slice is written as its own chunk, so no stacked
tensor is ever built: a save planner hands `torch.distributed.checkpoint` one converted tensor at a
time, as the writer asks.
"""

from __future__ import annotations

import io
import json
import re
import shutil
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

from ..execute import execute
from ..plan import Group, Plan, format_env
from ..sinks import DictSink
from ..sources import TOKENIZER_FILES, Checkpoint
from . import keys as K
from .args import CHECKPOINT_VERSION, make_args
from .bridge import BRIDGE_METADATA, provider_section, vocab_rows, write_run_config
from .dcp_errors import CheckpointException, first_failure
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


def _placement(key: str, cfg: dict[str, Any]) -> tuple[str, list[int], list[int]]:
    """Where a tensor sits in megatron-core's sharded state dict: its key there, and its index into
    (and the size of) the stacked leading dims. megatron-core keys layers one by one once dense and MoE
    layers mix (`moe_layer_freq` not 1), and stacks them otherwise."""
    fqn, offsets, sizes = key, [], []
    layer = K.layer_of(key)
    if layer is not None and not cfg.get("mlp_only_layers"):
        fqn, offsets, sizes = _stacked(key), [layer], [cfg["num_layers"]]
    expert = K.DIST_EXPERTS.search(fqn)
    if expert:
        fqn = fqn[:expert.start(1)]
        offsets, sizes = [*offsets, int(expert.group(1))], [*sizes, cfg["num_experts"]]
    return fqn, offsets, sizes


def _tensor_item(key: str, dtype: torch.dtype, shape: tuple[int, ...], cfg: dict[str, Any]) -> WriteItem:
    fqn, lead, lead_sizes = _placement(key, cfg)
    props = TensorProperties(dtype=dtype)
    offsets = torch.Size([*lead] + [0] * len(shape))
    chunk = ChunkStorageMetadata(offsets, torch.Size([1] * len(lead) + list(shape)))
    return WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD if lead else WriteItemType.TENSOR,
                     tensor_data=TensorWriteData(chunk, props, torch.Size([*lead_sizes, *shape])))


def _extra_state(keys: list[str], modules: set[str], cfg: dict[str, Any]) -> list[str]:
    """megatron-core's `_extra_state` objects (None for local layers) of the listed per-layer modules,
    one per stored slice of their weight, named by that slice's place: `shard_<offsets>_<sizes>`."""
    out = []
    for key in keys:
        module = re.sub(r"\.weight\d*$", "", key)
        if module != key and _LAYER.sub(".layers.{i}.", module, count=1) in modules:
            fqn, lead, sizes = _placement(key, cfg)
            shard = f"{'.'.join(map(str, lead)) or 0}_{'.'.join(map(str, sizes)) or 1}"
            out.append(f"{fqn.rsplit('.', 1)[0]}._extra_state/shard_{shard}")
    return out


def write_megatron_dist(ckpt: Checkpoint, plan: Plan, folder: Path, dtype: torch.dtype | None,
                        max_shard_size: int | None, on_tensor: Callable[[int], None] | None, *,
                        layout: Layout = SINGLE, iteration: int | str = "release", bridge: bool = False) -> None:
    """`bridge`: Megatron-Bridge's layout (run_config.yaml instead of common.pt, the vocabulary as Bridge's
    import leaves it, the tokenizer in the iteration's tokenizer/) at iteration 0 unless one is given."""
    cfg, fmt = plan.config, ckpt.spec.format(plan.dst_format)
    given = {"tensor_parallel": layout.tp}
    if bridge:
        given["padded_vocab_size"] = vocab_rows(cfg["vocab_size"], layout.tp)
        iteration = 0 if iteration == "release" else iteration
    env = format_env(fmt, cfg, given)
    target = folder / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    target.mkdir()
    out_dtype = plan.outputs[0][1] if plan.outputs else torch.float32
    args = make_args(ckpt.spec, cfg, layout, env["padded_vocab_size"], env["make_vocab_size_divisible_by"],
                     out_dtype, "torch_dist", te=True, where=ckpt.path)
    step = 0 if iteration == "release" else int(iteration)
    # Bridge 0.6 (megatron-core 0.19) keeps this inside the .distcp files; megatron-core up to 0.18, and
    # Megatron-LM and Bridge's fallback to its args, read common.pt, which 0.19 still reads first
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step}, target / "common.pt")
    if bridge:
        _bridge_files(ckpt, target, args, cfg["vocab_size"], plan.dst_format, step)
    (target / "metadata.json").write_text(json.dumps(BRIDGE_METADATA if bridge else METADATA))
    items = [_tensor_item(k, d, s, cfg) for k, d, s in plan.outputs]
    keys = {(i.index.fqn, i.index.offset): k for i, (k, _, _) in zip(items, plan.outputs)}
    extra = _extra_state([k for k, _, _ in plan.outputs], set(fmt.write.get("extra_state", [])), cfg)
    items += [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO) for name in extra]
    groups = {w.key: g for g in plan.groups for w in g.writes}

    def produce(item: WriteItem) -> Any:
        if item.type == WriteItemType.BYTE_IO:
            return _none_bytes()
        key = keys[(item.index.fqn, item.index.offset)]
        tensor = _convert(plan, groups[key], ckpt, dtype)[key]
        if on_tensor:
            on_tensor(tensor.numel() * tensor.element_size())
        return tensor.view(item.tensor_data.chunk.sizes)

    writer = dcp.FileSystemWriter(target, single_file_per_rank=True, thread_count=1)
    try:
        dcp.save({}, storage_writer=writer, planner=_ConvertingPlanner(items, produce), no_dist=True)
    except CheckpointException as exc:   # a BaseException: give back what failed (bad input, full disk, a bug)
        raise first_failure(exc) from None
    (folder / TRACKER).write_text(f"{iteration}\n")
    if bridge:
        shutil.copy2(target / "train_state.pt", folder / "latest_train_state.pt")


def _bridge_files(ckpt: Checkpoint, target: Path, args: Any, vocab: int, key_layout: str, step: int) -> None:
    """run_config.yaml, train_state.pt (Bridge's TrainState: plain tensors) and tokenizer/."""
    source = ckpt.info.get("megatron", {}).get("bridge", {}).get("hf_model_id") if ckpt.format != "hf" \
        else str(Path(ckpt.path).resolve())
    write_run_config(target, provider_section(args, vocab, key_layout, source))
    torch.save({"step": torch.tensor(step), "consumed_train_samples": torch.tensor(0),
                "skipped_train_samples": torch.tensor(0), "consumed_valid_samples": torch.tensor(0),
                "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
                "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)},
               target / "train_state.pt")
    tokenizer = [f for f in ckpt.extra_files if f.name in TOKENIZER_FILES]
    if tokenizer:
        (target / "tokenizer").mkdir()
        for f in tokenizer:
            shutil.copy2(f, target / "tokenizer" / f.name)


def _convert(plan: Plan, group: Group, ckpt: Checkpoint, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sink = DictSink()
    execute(replace(plan, groups=[group]), ckpt, sink, dtype)
    return sink.tensors
