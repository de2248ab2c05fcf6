"""torch.save's file format, written one record at a time.

`torch.save` pickles a whole object graph whose tensors must all be in memory at once: for a
Megatron rank file that is the whole rank. Here the pickle is made first from `PlannedTensor`
placeholders (dtype and shape are known from the plan), and each tensor's bytes are written as its own
zip record when the converter produces it, so memory holds one tensor. The records are the ones torch
writes (`data.pkl`, `byteorder`, `data/<key>` aligned to 64 bytes, `version`, ...), so
`torch.load(weights_only=True)`, its `mmap=True` and Megatron-LM read the file as one torch.save wrote.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import RosetoolError

_ALIGN = 64            # torch aligns every storage record's data, so files can be memory-mapped
_PAD_ID = 0x4246       # the zip extra-field id torch pads local headers with ("FB")
_STAMP = (1980, 1, 1, 0, 0, 0)


@dataclass(eq=False)
class PlannedTensor:
    """A contiguous tensor the file will hold, known by dtype and shape before its bytes exist."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: str = ""      # its storage record, given when the file is opened

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __reduce_ex__(self, protocol: int) -> tuple[Any, tuple[Any, ...]]:
        """What torch.save pickles for a tensor: a typed storage for the classic dtypes; an untyped one
        plus the dtype for those without a storage class (float8, ...)."""
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        args = (_Storage(self), 0, self.shape, stride, False, OrderedDict())
        if self.dtype in torch.storage._dtype_to_storage_type_map():
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.dtype)


@dataclass(eq=False)
class _Storage:
    tensor: PlannedTensor


class _Pickler(pickle.Pickler):
    """Numbers storages in the order the pickle meets them; a tensor under two names is one storage."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=2)
        self.storages: dict[int, PlannedTensor] = {}

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if not isinstance(obj, _Storage):
            return None
        planned = obj.tensor
        if id(planned) not in self.storages:
            planned.key = str(len(self.storages))
            self.storages[id(planned)] = planned
        typed = torch.storage._dtype_to_storage_type_map().get(planned.dtype)
        if typed is None:
            return "storage", torch.storage.UntypedStorage, planned.key, "cpu", planned.nbytes
        return "storage", getattr(torch, typed), planned.key, "cpu", math.prod(planned.shape)


class TorchZipWriter:
    """Open with the object to save (tensors as `PlannedTensor`), `write` each tensor's bytes in any
    order, `close` once all are written. A tensor whose dtype or shape differs from its plan is refused."""

    def __init__(self, path: Path, obj: Any):
        buf = io.BytesIO()
        pickler = _Pickler(buf)
        pickler.dump(obj)
        self._pending = {p.key: p for p in pickler.storages.values()}
        self._path, self._prefix = path, path.stem
        self._zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._record("data.pkl", buf.getvalue())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(_ALIGN).encode())
        self._record("byteorder", b"little")

    def planned(self) -> list[PlannedTensor]:
        return list(self._pending.values())

    def write(self, planned: PlannedTensor, tensor: torch.Tensor) -> None:
        if self._pending.pop(planned.key, None) is not planned:
            raise RosetoolError(f"{self._path}: storage {planned.key} written twice or not planned")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RosetoolError(f"{self._path}: planned {planned.dtype} {list(planned.shape)} for storage "
                                f"{planned.key}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._record(f"data/{planned.key}", memoryview(data))

    def close(self) -> None:
        if self._pending:
            raise RosetoolError(f"{self._path}: {len(self._pending)} tensor(s) never written")
        self._record("version", b"3\n")
        self._record(".data/serialization_id", b"0" * 40)
        self._zip.close()

    def abort(self) -> None:
        self._zip.close()

    def _record(self, name: str, data: bytes | memoryview) -> None:
        """A stored (uncompressed) record whose data starts on a 64-byte boundary, as torch lays them out."""
        info = zipfile.ZipInfo(f"{self._prefix}/{name}", date_time=_STAMP)
        size = len(data) if isinstance(data, bytes) else data.nbytes
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT     # zipfile's own test for a zip64 local header
        header = 30 + len(info.filename.encode()) + (20 if zip64 else 0) + 4
        pad = -(self._zip.fp.tell() + header) % _ALIGN
        info.extra = struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        info.file_size = size
        with self._zip.open(info, "w", force_zip64=zip64) as out:
            out.write(data)
