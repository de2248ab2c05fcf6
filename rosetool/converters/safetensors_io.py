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
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..lazy_torch import torch

# safetensors dtype code -> (torch dtype name, bytes per element): names, so a header is read without torch
CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),   # UE8M0 block scales (DeepSeek-V3.1's scale_fmt)
}
_BY_NAME = {name: code for code, (name, _) in CODES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    return _BY_NAME[str(dtype).removeprefix("torch.")]
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives; byte offsets only for formats that store raw bytes (safetensors)."""
    name: str
    code: str                  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int | None = None   # absolute byte offsets in `file`
    end: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, CODES[self.code][0])

    @property
    def dtype_name(self) -> str:
        return CODES[self.code][0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * CODES[self.code][1]


def require_regular_file(path: Path) -> int:
    """The size of `path`, refusing anything but a regular file: opening a FIFO would block forever."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    return st.st_size


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json.loads` keeps the last of two equal keys; in a header that hides a tensor."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, h: object, base: int) -> TensorInfo:
    """One header entry, checked field by field as the safetensors format defines it."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry ({what})")
    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise bad("expected exactly dtype, shape and data_offsets")
    if h["dtype"] not in CODES:
        raise bad(f"unknown dtype {h['dtype']!r}")
    shape, offsets = h["shape"], h["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets {offsets!r} are not two non-negative integers")
    b, e = offsets
    if b > e:
        raise bad(f"data_offsets [{b}, {e}] begin after they end")
    info = TensorInfo(name, h["dtype"], tuple(shape), path, base + b, base + e)
    if e - b != info.nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} holds {e - b} bytes, its shape needs {info.nbytes}")
    return info


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a header before any data moves: a JSON object of well-formed entries with unique
    names whose byte ranges tile the data section exactly (no gap, no overlap, no trailing bytes)."""
    size = require_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {str(exc)!r} listed twice)") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    infos = {name: _entry(path, name, h, base) for name, h in header.items()}
    pos = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the tensor before it" if info.start < pos else f"leaves a gap at byte {pos}"
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor {info.name!r} {what})")
        if info.end > size:
            raise CheckpointError(f"{path}: truncated: tensor {info.name!r} ends at byte {info.end}, file has {size}")
        pos = info.end
    if pos != size:
        raise CheckpointError(f"{path}: corrupt safetensors file ({size - pos} bytes after the last tensor)")
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
            header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
