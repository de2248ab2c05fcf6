"""Load Megatron's `model_optim_rng.pt` without Megatron and without running foreign code.

These pickles reference Megatron classes (enums in `args`, optimizer and rerun-state objects), so
`weights_only=True` refuses them and plain unpickling imports whatever they name. This unpickler
allows a short list of data-only globals, turns Megatron-ecosystem classes into inert stubs, and
refuses everything else.
"""

from __future__ import annotations

import io
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.serialization import StorageType

from ...errors import CheckpointError

_ALLOWED = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("argparse", "Namespace"),
    ("torch", "Size"), ("torch", "device"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_tensor"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("_io", "BytesIO"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
}
# torch.distributed.checkpoint's `.metadata`: its dataclasses and enum, and the helpers their pickles name.
_DCP_METADATA = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.planner", n) for n in (   # megatron-core saves its plans alongside
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"), ("torch", "Size")}
_STUBBED = ("megatron", "transformer_engine", "apex", "nvidia_resiliency_ext", "modelopt")


class Stub:
    """Stands in for a Megatron object: keeps its constructor args and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__name__} stub>"


def _stub(module: str, name: str) -> type:
    return type(name, (Stub,), {"__module__": module})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _STUBBED:
            return _stub(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a global outside the allow list: refused, as opposed to merely corrupt."""


class MetadataUnpickler(pickle.Unpickler):
    """Only the classes a torch_dist `.metadata` holds; Megatron objects in `planner_data` become stubs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _STUBBED:
            return _stub(module, name)
        raise RefusedGlobal(f"global {module}.{name} is not allowed")


def load_dist_metadata(path: Path) -> Any:
    """A torch_dist `.metadata` (`FileSystemReader.read_metadata` would `pickle.load` it unrestricted)."""
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f).load()
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: refused an unsafe pickle ({str(exc).splitlines()[0][:200]})") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated torch_dist metadata "
                              f"({type(exc).__name__}: {str(exc)[:160]})") from None


_PICKLE_MODULE = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=pickle.load,
                                       __name__="rosetool_restricted_pickle")


def load_rank_file(path: Path) -> dict[str, Any]:
    """A rank file with its tensors memory-mapped (for callers that want real tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_PICKLE_MODULE)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused an unsafe pickle ({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({str(exc).splitlines()[0][:160]})") from None


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a rank file that is not read yet: where its bytes are and how to view them.

    Reading record by record (no mmap) keeps resident memory at the tensors in use; a mapped file
    would count every page a conversion ever touched."""
    file: Path
    record: str
    dtype: torch.dtype
    nbytes: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def load(self) -> torch.Tensor:
        reader = torch._C.PyTorchFileReader(str(self.file))
        storage = reader.get_storage_from_record(f"data/{self.record}", self.nbytes, torch.uint8).untyped_storage()
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.shape, self.stride)


@dataclass(frozen=True)
class _Storage:
    record: str
    dtype: torch.dtype
    nbytes: int


class _LazyUnpickler(RestrictedUnpickler):
    def __init__(self, data: io.BytesIO, path: Path):
        super().__init__(data)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        _, storage_type, key, _, numel = pid
        return _Storage(str(key), storage_type.dtype, numel * storage_type.dtype.itemsize)

    def _tensor(self, storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> LazyTensor:
        return LazyTensor(self.path, storage.record, storage.dtype, storage.nbytes, offset, tuple(size), tuple(stride))


def index_rank_file(path: Path) -> dict[str, Any]:
    """A rank file's contents with every tensor left on disk as a `LazyTensor`."""
    try:
        data = io.BytesIO(torch._C.PyTorchFileReader(str(path)).get_record("data.pkl"))
        return _LazyUnpickler(data, path).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused an unsafe pickle ({str(exc).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({str(exc).splitlines()[0][:160]})") from None
