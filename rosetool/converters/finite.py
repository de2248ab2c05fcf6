"""NaN and Inf in source weights: a warning naming each tensor, or with `--strict` an error.

A converter copies bytes faithfully, so a NaN would travel on silently and surface only as garbage
generations. The scan reads each floating-point tensor once, in bounded chunks straight from the file
where its bytes are raw (safetensors), otherwise through the checkpoint's reader (one tensor at a time).
During a conversion (`scan_alongside`) the raw ranges are scanned in a thread while the output is
written, so the scan costs no extra pass over the source on the critical path; findings are reported
before the output is committed, so with `--strict` nothing reaches the destination either way.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import CheckpointError, RosetoolWarning
from .safetensors_io import TensorInfo
from .sources import Checkpoint

_CHUNK = 4 << 20     # two buffers of this (file bytes, masked bits), reused for every tensor


# float8 dtypes have no min/max kernels: their raw bits are checked instead. (integer view, magnitude
# bits, the smallest magnitude that is NaN/Inf, i.e. exponent all ones)
_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float8_e5m2: (torch.uint8, 0x7F, 0x7C),
    torch.float8_e4m3fn: (torch.uint8, 0x7F, 0x7F),   # no Inf; S.1111.111 is its only NaN
    torch.float8_e8m0fnu: (torch.uint8, 0xFF, 0xFF),  # block exponents: 0xFF is NaN
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


# Raw bits of a file chunk: a value is NaN/Inf exactly when its bits under `mask` are all set (the whole
# exponent; float8_e4m3fn has no Inf and S.1111.111 is its only NaN). numpy checks this single-threaded,
# allocation-free (`bitwise_and` into a reused buffer, then `max`), beside a conversion's own threads.
_MASKS: dict[torch.dtype, tuple[type, int]] = {
    torch.float64: (np.uint64, 0x7FF0000000000000),
    torch.float32: (np.uint32, 0x7F800000),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float16: (np.uint16, 0x7C00),
    torch.float8_e5m2: (np.uint8, 0x7C),
    torch.float8_e4m3fn: (np.uint8, 0x7F),
    torch.float8_e8m0fnu: (np.uint8, 0xFF),
}


def _chunk_nonfinite(chunk: np.ndarray, dtype: torch.dtype, scratch: np.ndarray) -> int:
    if dtype not in _MASKS:
        return count_nonfinite(torch.from_numpy(chunk).view(dtype))
    uint, mask = _MASKS[dtype]
    bits = np.bitwise_and(chunk.view(uint), uint(mask), out=scratch[:chunk.nbytes].view(uint))
    if not bits.size or bits.max() != mask:
        return 0
    return int(np.count_nonzero(bits == mask))


def _count_in_file(meta: TensorInfo, buf: np.ndarray, scratch: np.ndarray) -> int:
    """Reads the tensor's bytes chunk by chunk into `buf` (reused: no allocation per tensor)."""
    step = buf.size - buf.size % meta.dtype.itemsize
    bad, pos, left = 0, meta.start, meta.end - meta.start
    with open(meta.file, "rb", buffering=0) as f:
        while left > 0:
            f.seek(pos)
            n = f.readinto(memoryview(buf[:min(left, step)]))
            if not n or n % meta.dtype.itemsize:
                raise CheckpointError(f"{meta.file}: truncated while reading tensor {meta.name!r}")
            bad += _chunk_nonfinite(buf[:n], meta.dtype, scratch)
            pos, left = pos + n, left - n
    return bad


def _stored(meta: object) -> list[object]:
    """What holds a tensor's bytes: itself, or for a quantized weight its codes and scales (scanned
    as stored, so the scan never pays for dequantizing)."""
    parts = getattr(meta, "parts", None)
    return [info for _, info in parts] if parts is not None else [meta]


def _is_raw(meta: object) -> bool:
    return all(getattr(m, "start", None) is not None for m in _stored(meta))


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    """File bytes and masked bits, reused for every tensor (not zero-filled: each chunk is read in first)."""
    return np.empty(_CHUNK, np.uint8), np.empty(_CHUNK, np.uint8)


def _scan(ckpt: Checkpoint, keys: Iterable[str], stop: threading.Event | None = None,
          buffers: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """One message per tensor holding NaN/Inf; `stop` ends the scan early (the conversion failed)."""
    buf, scratch = buffers or _buffers()
    found = []
    for key in keys:
        if stop is not None and stop.is_set():
            break
        top = ckpt.tensors[key]
        if not _is_raw(top):
            if top.dtype.is_floating_point and (bad := count_nonfinite(ckpt.read(key))):
                found.append(f"{top.file}: tensor {key!r} has {bad} NaN/Inf value(s)")
            continue
        for meta in _stored(top):
            if meta.dtype.is_floating_point and (bad := _count_in_file(meta, buf, scratch)):
                found.append(f"{meta.file}: tensor {meta.name!r} has {bad} NaN/Inf value(s)")
    return found


def _report(found: list[str], strict: bool) -> None:
    if found and strict:
        raise CheckpointError(f"{found[0]} (--strict)")
    for message in found:
        warnings.warn(message, RosetoolWarning, stacklevel=3)


def check_finite(ckpt: Checkpoint, keys: Iterable[str], strict: bool = False) -> None:
    _report(_scan(ckpt, keys), strict)


@contextmanager
def scan_alongside(ckpt: Checkpoint, keys: Iterable[str], strict: bool = False) -> Iterator[None]:
    """Scan while the body writes. Tensors that only the checkpoint's reader can give are scanned first
    (readers are not made for two threads); raw file ranges in a thread beside the body. Findings are
    reported when the body ends, so enter this inside the output's atomic folder: a `--strict` refusal
    then leaves nothing behind."""
    keys = list(keys)
    check_finite(ckpt, [k for k in keys if not _is_raw(ckpt.tensors[k])], strict)
    raw = [k for k in keys if _is_raw(ckpt.tensors[k])]
    stop, outcome, buffers = threading.Event(), [], _buffers()   # allocated here: the thread allocates nothing

    def run() -> None:
        try:
            outcome.append(_scan(ckpt, raw, stop, buffers))
        except BaseException as exc:    # handed to the caller's thread, which reports it
            outcome.append(exc)

    thread = threading.Thread(target=run, name="rosetool-finite-scan", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()         # the conversion failed: its error is the one to report
        thread.join()
        raise
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    _report(outcome[0], strict)
