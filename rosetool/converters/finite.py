"""NaN and Inf in source weights: a warning naming each tensor, or with `--strict` an error.

A converter copies bytes faithfully, so a NaN would travel on silently and surface only as garbage
generations. The scan runs before anything is written and reads each floating-point tensor once, in
bounded chunks straight from the file where its bytes are raw (safetensors), otherwise through the
checkpoint's reader (one tensor at a time).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from ..errors import CheckpointError, RosetoolWarning
from .safetensors_io import TensorInfo
from .sources import Checkpoint

_CHUNK = 16 << 20


# float8 dtypes have no min/max kernels: their raw bits are checked instead. (integer view, magnitude
# bits, the smallest magnitude that is NaN/Inf, i.e. exponent all ones)
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float8_e5m2: (torch.uint8, 0x7F, 0x7C),
    torch.float8_e4m3fn: (torch.uint8, 0x7F, 0x7F),   # no Inf; S.1111.111 is its only NaN
}


def count_nonfinite(tensor: torch.Tensor) -> int:
    """`aminmax` reads the data once and writes nothing, and NaN, Inf or -Inf anywhere shows in its
    result, so clean tensors (nearly all) cost one fast pass; only a hit pays for the exact count."""
    if tensor.numel() == 0:
        return 0
    if tensor.dtype in _BITS:
        int_dtype, magnitude, first_bad = _BITS[tensor.dtype]
        return int((tensor.contiguous().view(int_dtype).bitwise_and(magnitude) >= first_bad).sum())
    low, high = torch.aminmax(tensor)
    if torch.isfinite(low) and torch.isfinite(high):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def _count_in_file(meta: TensorInfo, buf: torch.Tensor) -> int:
    """Reads the tensor's bytes chunk by chunk into `buf` (reused: no allocation per tensor)."""
    step = buf.numel() - buf.numel() % meta.dtype.itemsize
    bad, pos, left = 0, meta.start, meta.end - meta.start
    with open(meta.file, "rb", buffering=0) as f:
        while left > 0:
            f.seek(pos)
            n = f.readinto(memoryview(buf[:min(left, step)].numpy()))
            if not n or n % meta.dtype.itemsize:
                raise CheckpointError(f"{meta.file}: truncated while reading tensor {meta.name!r}")
            bad += count_nonfinite(buf[:n].view(meta.dtype))
            pos, left = pos + n, left - n
    return bad


def check_finite(ckpt: Checkpoint, keys: Iterable[str], strict: bool = False) -> None:
    buf = torch.empty(_CHUNK, dtype=torch.uint8)   # not zero-filled: every chunk is read into it first
    for key in keys:
        meta = ckpt.tensors[key]
        if not meta.dtype.is_floating_point:
            continue
        raw = getattr(meta, "start", None) is not None
        bad = _count_in_file(meta, buf) if raw else count_nonfinite(ckpt.read(key))
        if bad:
            message = f"{meta.file}: tensor {key!r} has {bad} NaN/Inf value(s)"
            if strict:
                raise CheckpointError(f"{message} (--strict)")
            warnings.warn(message, RosetoolWarning, stacklevel=2)
