"""Safetensors read and write, one tensor at a time.

`safetensors.safe_open` memory-maps whole files, which counts every touched page towards RSS; reading
each tensor with `readinto` and writing with `pwrite` keeps peak memory at the largest tensor.
The writer knows every name, dtype and shape from the plan, so the header is written first and each
tensor lands at its offset whenever it is ready.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives; byte offsets only for formats that store raw bytes (safetensors)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int | None = None   # absolute byte offsets in `file`
    end: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a header: every tensor must lie inside the file and match its shape."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry") from None
        info = TensorInfo(name, dtype, shape, path, 8 + n + b, 8 + n + e)
        if info.end - info.start != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} holds {e - b} bytes, its shape needs {info.nbytes}")
        if info.end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {info.end}, file has {size}")
        infos[name] = info
    return infos, meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    out = torch.empty(info.shape, dtype=info.dtype)   # not zero-filled: readinto overwrites it all
    if info.nbytes:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return out


def _copy_range(src_fd: int, dst_fd: int, src_pos: int, dst_pos: int, length: int) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_pos, dst_pos)
        except OSError:   # filesystems without copy_file_range (or across devices on old kernels)
            n = os.pwrite(dst_fd, os.pread(src_fd, min(length, 64 << 20), src_pos), dst_pos)
        if n == 0:
            raise CheckpointError(f"source ended while copying {length} more bytes")
        src_pos, dst_pos, length = src_pos + n, dst_pos + n, length - n


class StreamWriter:
    """Writes one safetensors file whose header is fixed up front; tensors may arrive in any order."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (dtype, tuple(shape), offset)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)   # keep tensor data 8-byte aligned
        self._base = 8 + len(blob)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self._fd, self._base + offset)
        self._pending = set(self._slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape, offset = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"planned {dtype} {shape}")
        self._pwrite(tensor, self._base + offset)
        self._pending.discard(name)

    def _pwrite(self, tensor: torch.Tensor, pos: int) -> None:
        data = memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        while data:
            n = os.pwrite(self._fd, data, pos)
            data, pos = data[n:], pos + n

    def write_rows(self, name: str, first: int, rows: torch.Tensor) -> None:
        """Fill rows first.. of a tensor's dim 0 (a stacked tensor, one expert at a time); the tensor
        counts as written once its last row is."""
        dtype, shape, offset = self._slots[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or first + rows.shape[0] > shape[0]:
            raise CheckpointError(f"{self.path}: rows {first}.. of {name!r} are {rows.dtype} {tuple(rows.shape)}, "
                                  f"planned {dtype} {shape}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._pwrite(rows, self._base + offset + first * row_bytes)
        if first + rows.shape[0] == shape[0]:
            self._pending.discard(name)

    def copy(self, name: str, ranges: list[tuple[Path, int, int]]) -> None:
        """Fill a tensor from byte ranges of other files, in the kernel (no Python buffers)."""
        dtype, shape, offset = self._slots[name]
        if sum(r[2] for r in ranges) != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: byte ranges for {name!r} do not fill its planned shape {shape}")
        pos = self._base + offset
        for path, start, length in ranges:
            with open(path, "rb", buffering=0) as src:
                _copy_range(src.fileno(), self._fd, start, pos, length)
            pos += length
        self._pending.discard(name)

    def close(self, complete: bool = True) -> None:
        """`complete=False` on failure: just release the file, the caller is discarding it."""
        os.close(self._fd)
        if complete and self._pending:
            raise CheckpointError(f"{self.path}: {len(self._pending)} planned tensor(s) never written, "
                                  f"e.g. {sorted(self._pending)[0]!r}")
