"""Read Megatron's torch_dist format (PyTorch distributed checkpoint) with plain torch.

Tensors are stored globally, so no TP merging; homogeneous layers are stacked as
`decoder.layers.<param>` with a leading [num_layers] dim and are presented per layer, and an MoE
layer's experts (one [num_experts, ...] tensor) are presented per expert. Each read loads only the
requested layer's and expert's slice, so memory stays at one tensor.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

from ...errors import CheckpointError, RosetoolError
from ..config_map import read_config
from ..counts import check_layer_count
from ..paths import inside
from ..plan import check_source_counts, expand_format
from ..sources import Checkpoint
from . import keys as K
from .args import config_from_args, spec_for_args, summary
from .bridge import NEMO_CONFIG, NEMO_PREFIX, RUN_CONFIG, args_from_provider, read_run_config
from .dcp_errors import CheckpointException, first_failure, reason
from .layout import iteration_dir
from .unpickler import load_dist_metadata, load_rank_file

_STACKED = re.compile(r"^(.*\blayers)\.([a-z_].*)$")
_WRAPPER = re.compile(r"^(module\.)+")


@dataclass(frozen=True)
class DistTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    fqn: str                 # key in the checkpoint
    lead: tuple[int, ...]    # indices into the stacked leading dims (layer, expert), outermost first


class _SlicePlanner(DefaultLoadPlanner):
    """Reads one region of one tensor: the chunks overlapping it, nothing else."""

    def __init__(self, meta: DistTensor, stored: TensorStorageMetadata):
        super().__init__()
        offsets = list(meta.lead) + [0] * len(meta.shape)
        sizes = [1] * len(meta.lead) + list(meta.shape)
        self._chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        self._meta, self._stored = meta, stored

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(create_read_items_for_chunk_list(self._meta.fqn, self._stored, [self._chunk]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]    # the slice buffer itself; item offsets are relative to it


class _CheckedReader(dcp.FileSystemReader):
    """Hands DCP the metadata read once through the restricted unpickler, never its own `pickle.load`."""

    def __init__(self, folder: Path, metadata: Metadata):
        super().__init__(folder)
        self._metadata = metadata

    def read_metadata(self, *args: object, **kwargs: object) -> Metadata:
        return self._metadata


def read_metadata(folder: Path) -> Metadata:
    """The `.metadata`, checked before DCP trusts it: the right types, data files inside `folder`."""
    path = inside(folder, ".metadata", folder / ".metadata")
    md = load_dist_metadata(path)
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: not torch_dist metadata (got {type(md).__name__})")
    for fqn, stored in md.state_dict_metadata.items():
        if isinstance(stored, TensorStorageMetadata) and not (
                isinstance(stored.properties.dtype, torch.dtype) and isinstance(stored.size, torch.Size)):
            raise CheckpointError(f"{path}: tensor {fqn!r} has a corrupt entry")
        for chunk in getattr(stored, "chunks", None) or ():   # DCP would fail with a KeyError mid-read
            if MetadataIndex(fqn, chunk.offsets) not in md.storage_data:
                raise CheckpointError(f"{path}: tensor {fqn!r}: its chunk at {list(chunk.offsets)} has no "
                                      f"storage record")
    files: set[str] = set()
    for index, where in md.storage_data.items():
        rel = getattr(where, "relative_path", None)
        fqn = getattr(index, "fqn", index)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in (".", "..") \
                or not all(isinstance(getattr(where, k, None), int) and getattr(where, k) >= 0
                           for k in ("offset", "length")):
            raise CheckpointError(f"{path}: tensor {fqn!r} points outside the checkpoint folder or at a bad range")
        if rel not in files:   # a data file symlinked out is refused, as a shard would be
            files.add(str(inside(folder, rel, folder / rel).name))
        if not (folder / rel).is_file():
            raise CheckpointError(f"{folder / rel}: missing data file for tensor {fqn!r}")
        if where.offset + where.length > (folder / rel).stat().st_size:
            raise CheckpointError(f"{folder / rel}: truncated: tensor {fqn!r} ends at byte "
                                  f"{where.offset + where.length}, file has {(folder / rel).stat().st_size}")
    md.storage_meta = md.storage_meta if isinstance(md.storage_meta, StorageMeta) else StorageMeta()
    return md


def _read(folder: Path, metadata: Metadata, meta: DistTensor) -> torch.Tensor:
    out = torch.empty([1] * len(meta.lead) + list(meta.shape), dtype=meta.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({meta.fqn: out}, storage_reader=_CheckedReader(folder, metadata),
                     planner=_SlicePlanner(meta, metadata.state_dict_metadata[meta.fqn]), no_dist=True)
    except (Exception, CheckpointException) as exc:   # DCP wraps reader failures in a BaseException
        if isinstance(first_failure(exc), RosetoolError):
            raise first_failure(exc) from None
        raise CheckpointError(f"{folder}: cannot read tensor {meta.name!r} ({reason(exc)})") from None
    return out.reshape(meta.shape)


def _index(folder: Path, stored: dict) -> dict[str, DistTensor]:
    out = {}
    for fqn, md in stored.items():
        if not isinstance(md, TensorStorageMetadata) or "_extra_state" in fqn:
            continue
        name = _WRAPPER.sub("", fqn)     # NeMo 2 saves the model under its wrapper's `module.`
        stacked, experts = _STACKED.match(name), K.DIST_EXPERTS.search(name)
        dims = bool(stacked) + bool(experts)
        if len(md.size) < dims:
            raise CheckpointError(f"{folder / '.metadata'}: tensor {fqn!r} has shape {list(md.size)}, "
                                  f"too few dims for its stacked layers/experts")
        for lead in itertools.product(*(range(n) for n in md.size[:dims])):
            key = f"{stacked.group(1)}.{lead[0]}.{stacked.group(2)}" if stacked else name
            key += str(lead[-1]) if experts else ""
            out[key] = DistTensor(key, md.properties.dtype, tuple(md.size[dims:]), folder / ".metadata", fqn, lead)
    return out


def nemo_config(folder: Path) -> Path | None:
    """NeMo 2's `context/model.yaml` when `folder` is its `weights/`."""
    path = folder.parent.joinpath(*NEMO_CONFIG)
    return path if folder.name == "weights" and path.is_file() else None


def saved_args(folder: Path, rows: int | None) -> tuple[Any, str, dict[str, Any], dict[str, Any] | None]:
    """The model's args, the file they came from, `common.pt`'s contents, and Megatron-Bridge's run
    config summary: Bridge saves no `common.pt`, only `run_config.yaml` (which wins where both exist,
    as it does for Bridge's own loader). NeMo 2 keeps the same provider fields in `context/model.yaml`
    and always pads the vocabulary (`rows`: the embedding's, for a config without `vocab_size`)."""
    if (folder / RUN_CONFIG).exists():
        run = read_run_config(folder / RUN_CONFIG)
        return args_from_provider(run.model, str(run.path)), str(run.path), {}, run.info()
    nemo = nemo_config(folder)
    if nemo:
        run = read_run_config(nemo, "config", NEMO_PREFIX, "NeMo 2 model config")
        model = {"should_pad_vocab": True, **run.model, "vocab_size": run.model.get("vocab_size") or rows}
        return args_from_provider(model, str(nemo)), str(nemo), {}, {**run.info(), "format": "NeMo 2"}
    common = load_rank_file(inside(folder, "common.pt", folder / "common.pt")) \
        if (folder / "common.pt").exists() or (folder / "common.pt").is_symlink() else {}
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise CheckpointError(f"{folder}: no Megatron-LM args (common.pt) and no Megatron-Bridge {RUN_CONFIG}; "
                              f"rosetool needs one of them for the model shape")
    return args, str(folder / "common.pt"), common, None


def open_megatron_dist(root: Path, vocab_size: int | None = None) -> Checkpoint:
    folder, iteration = (root / "weights", "release") if nemo_config(root / "weights") else iteration_dir(root)
    metadata = read_metadata(folder)
    metas = _index(folder, metadata.state_dict_metadata)
    embedding = metas.get("embedding.word_embeddings.weight")
    args, where, common, bridge = saved_args(folder, embedding.shape[0] if embedding else None)
    check_layer_count(getattr(args, "num_layers", None), len(metas), where)
    spec = spec_for_args(args, where)
    fmt_name = K.detect_format(list(metas), spec.formats)
    config = read_config(spec, spec.format(fmt_name), config_from_args(args, vocab_size), where)
    params = {"padded_vocab_size": getattr(args, "padded_vocab_size", config["vocab_size"])}
    check_source_counts(spec, spec.format(fmt_name), config, params, metas, folder / "common.pt")
    expand_format(spec, spec.format(fmt_name), config, params)   # fail early if the ops do not fit
    info = {"params": params, "iteration": iteration,
            "megatron": {"format": "torch_dist", "layout": fmt_name, "checkpoint_version":
                         common.get("checkpoint_version"), "args": summary(args),
                         **({"bridge": bridge} if bridge else {})}}
    return Checkpoint(root, fmt_name, spec, {}, config, metas, lambda k: _read(folder, metadata, metas[k]), [], info)
