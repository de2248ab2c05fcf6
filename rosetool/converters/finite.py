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


def count_nonfinite(tensor: torch.Tensor) -> int:
    """A NaN or Inf anywhere makes the sum non-finite, and summing is several times faster than
    `isfinite`; only a sum that is not finite (or overflowed) pays for the exact count."""
    if tensor.dtype.itemsize == 1:   # float8: no sum or isfinite kernels for it
        tensor = tensor.float()
    total = tensor.sum(dtype=torch.float32) if tensor.dtype.itemsize == 2 else tensor.sum()
    if torch.isfinite(total):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def _count_in_file(meta: TensorInfo) -> int:
    itemsize = meta.dtype.itemsize
    buf = bytearray(_CHUNK - _CHUNK % itemsize)
    bad, pos, left = 0, meta.start, meta.end - meta.start
    with open(meta.file, "rb", buffering=0) as f:
        while left > 0:
            f.seek(pos)
            n = f.readinto(memoryview(buf)[:min(left, len(buf))])
            if not n:
                raise CheckpointError(f"{meta.file}: truncated while reading tensor {meta.name!r}")
            bad += count_nonfinite(torch.frombuffer(buf, dtype=meta.dtype, count=n // itemsize))
            pos, left = pos + n, left - n
    return bad


def check_finite(ckpt: Checkpoint, keys: Iterable[str], strict: bool = False) -> None:
    for key in keys:
        meta = ckpt.tensors[key]
        if not meta.dtype.is_floating_point:
            continue
        raw = getattr(meta, "start", None) is not None
        bad = _count_in_file(meta) if raw else count_nonfinite(ckpt.read(key))
        if bad:
            message = f"{meta.file}: tensor {key!r} has {bad} NaN/Inf value(s)"
            if strict:
                raise CheckpointError(f"{message} (--strict)")
            warnings.warn(message, RosetoolWarning, stacklevel=2)
