"""Run a plan: per group, read the source tensors, undo their ops into canonical tensors, apply the
target's ops, hand each result to a sink. Only one group is alive at a time.

When a target tensor's bytes are source bytes in order (no op, or only a dim-0 concat/split or an
expert stack, same dtype), the plan knows their file ranges, and a sink that can copy ranges moves
them file to file in the kernel (`copy_file_range`) without touching Python memory. Otherwise a
stacked expert tensor ([E, 2*ffn, hidden], GBs for a large layer) is still written expert by expert
into a sink that takes rows, so memory stays bounded by the largest source tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..mappings.ops import Concat, Stack
from .plan import Group, Plan, Step
from .sources import Checkpoint

_TRIM_EVERY = 256 << 20


class Sink(Protocol):
    def write(self, key: str, tensor: torch.Tensor) -> None: ...


ByteRange = tuple[Path, int, int]   # file, offset, length


def _in_byte_order(step: Step) -> bool:
    ops = step.chain.ops
    return ops in ((), (Concat(0),)) or (len(ops) == 1 and isinstance(ops[0], Stack))


def _canonical_ranges(group: Group, plan: Plan, ckpt: Checkpoint) -> dict[str, ByteRange]:
    """Canonical tensors that are one contiguous byte range of a source file."""
    out: dict[str, ByteRange] = {}
    for step in group.reads:
        meta = ckpt.tensors[plan.source_keys[step.key]]
        start = getattr(meta, "start", None)   # None: not raw bytes in a file (pickles, DCP)
        if start is None or not _in_byte_order(step):
            continue
        for name, shape in zip(step.sources, step.trace[0]):
            length = math.prod(shape) * meta.dtype.itemsize
            out[name] = (meta.file, start, length)
            start += length
    return out


def _write_ranges(step: Step, ranges: dict[str, ByteRange], dtype_ok: bool) -> list[ByteRange] | None:
    if dtype_ok and _in_byte_order(step) and all(s in ranges for s in step.sources):
        return [ranges[s] for s in step.sources]
    return None


def _streams(step: Step, sink: Sink) -> bool:
    ops = step.chain.ops
    return hasattr(sink, "write_rows") and len(ops) == 1 and isinstance(ops[0], Stack)


def _write_stacked(step: Step, group: Group, plan: Plan, ckpt: Checkpoint, sink: Sink,
                   dtype: torch.dtype | None) -> int:
    """One expert at a time: read the source tensors that expert's canonical tensors come from, fuse
    its rows, hand them to the sink, drop them. A source that spans several experts (an already
    fused tensor) stays read until its last expert is written, so it is read once."""
    parts = step.chain.ops[0].parts
    nbytes = 0
    held: dict[str, dict[str, torch.Tensor]] = {}    # read key -> the canonical tensors it gave
    for first in range(0, len(step.sources), parts):
        names = set(step.sources[first:first + parts])
        reads = [r for r in group.reads if names.intersection(r.sources)]
        held = {r.key: held.get(r.key) or dict(zip(r.sources, r.chain.inverse(
            [ckpt.read(plan.source_keys[r.key])], r.trace))) for r in reads}
        canonical = {k: v for parts_of in held.values() for k, v in parts_of.items()}
        rows = torch.cat([canonical[n] for n in step.sources[first:first + parts]])[None]
        rows = rows if dtype is None else rows.to(dtype)
        sink.write_rows(step.key, first // parts, rows)
        nbytes += rows.numel() * rows.element_size()
    return nbytes


def _malloc_trim() -> Callable[[], None]:
    """glibc keeps freed tensor buffers below its (growing) mmap threshold; hand them back so RSS
    tracks the live group rather than the allocator's history."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    return (lambda: trim(0)) if trim else (lambda: None)


release_freed_memory = _malloc_trim()


def _copy_stored(parts: list[tuple[str, object]], ckpt: Checkpoint, sink: Sink) -> int:
    """An encoded tensor kept as stored: each part (codes, scales) byte for byte."""
    nbytes = 0
    for name, info in parts:
        if getattr(info, "start", None) is not None and hasattr(sink, "copy"):
            sink.copy(name, [(info.file, info.start, info.nbytes)])
        else:
            sink.write(name, ckpt.info["quant"].read_stored(info.name))
        nbytes += info.nbytes
    return nbytes


def execute(plan: Plan, ckpt: Checkpoint, sink: Sink, dtype: torch.dtype | None = None,
            on_tensor: Callable[[int], None] | None = None) -> None:
    since_trim = 0
    can_copy = hasattr(sink, "copy")
    for group in plan.groups:
        ranges = _canonical_ranges(group, plan, ckpt) if can_copy else {}
        src_dtype = ckpt.tensors[plan.source_keys[group.reads[0].key]].dtype
        slow = []
        for step in group.writes:
            if step.key in plan.stored:
                nbytes = _copy_stored(plan.stored[step.key], ckpt, sink)
                if on_tensor:
                    on_tensor(nbytes)
                continue
            byte_ranges = _write_ranges(step, ranges, dtype in (None, src_dtype))
            if byte_ranges is None:
                slow.append(step)
                continue
            sink.copy(step.key, byte_ranges)
            if on_tensor:
                on_tensor(sum(r[2] for r in byte_ranges))
        for step in [s for s in slow if _streams(s, sink)]:
            slow.remove(step)
            nbytes = _write_stacked(step, group, plan, ckpt, sink, dtype)
            since_trim += nbytes
            if on_tensor:
                on_tensor(nbytes)
        needed = {s for step in slow for s in step.sources}
        canonical: dict[str, torch.Tensor] = {}
        for step in group.reads:
            if needed.intersection(step.sources):
                tensor = ckpt.read(plan.source_keys[step.key])
                canonical.update(zip(step.sources, step.chain.inverse([tensor], step.trace)))
        for step in slow:
            (out,) = step.chain.forward([canonical[s] for s in step.sources])
            if dtype is not None:
                out = out.to(dtype)
            sink.write(step.key, out)
            nbytes = out.numel() * out.element_size()
            since_trim += nbytes
            if on_tensor:
                on_tensor(nbytes)
        del canonical
        if since_trim > _TRIM_EVERY:
            release_freed_memory()
            since_trim = 0
