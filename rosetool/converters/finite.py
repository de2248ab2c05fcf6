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


# float dtype -> (same-width integer view, its magnitude bits, the smallest magnitude that is NaN/Inf):
# exponent all ones. Integer ops on the raw bits run several times faster than `isfinite`.
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float8_e5m2: (torch.uint8, 0x7F, 0x7C),
    torch.float8_e4m3fn: (torch.uint8, 0x7F, 0x7F),   # no Inf; S.1111.111 is its only NaN
}


def count_nonfinite(tensor: torch.Tensor, scratch: bool = False) -> int:
    """`scratch=True`: the tensor is a buffer of ours and is overwritten instead of copied."""
    if tensor.dtype not in _BITS:
        return int(tensor.numel() - torch.isfinite(tensor).sum())
    int_dtype, magnitude, first_bad = _BITS[tensor.dtype]
    bits = tensor.contiguous().view(int_dtype)
    bits = bits.bitwise_and_(magnitude) if scratch else bits.bitwise_and(magnitude)
    if bits.numel() == 0 or int(bits.max()) < first_bad:
        return 0
    return int((bits >= first_bad).sum())


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
            bad += count_nonfinite(buf[:n].view(meta.dtype), scratch=True)
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
