"""Merge adapters into a base as its tensors stream through the converter.

`with_adapters` wraps a checkpoint so that reading an adapted tensor returns W + scale * B @ A: the
source tensor is taken apart into canonical tensors (the spec's inverse ops, exact copies), each
adapter in order adds its delta in fp32 (or replaces the tensor, for `modules_to_save`), the result
is put back together and cast once, to the output dtype. Every other tensor reads as before, and
unadapted tensors keep their file-to-file copy, so a merge holds one tensor at a time, like any
conversion, and works from any source format to any target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from ..converters.plan import expand_format, match_source
from ..converters.sources import Checkpoint
from .lora import Bound, bind
from .open import open_adapter


def bind_all(base: Checkpoint, paths: Sequence[str | Path]) -> list[Bound]:
    """Open and check every adapter before a byte of the base is read."""
    return [bind(open_adapter(p, base), base) for p in paths]


def with_adapters(base: Checkpoint, paths: Sequence[str | Path], dtype: torch.dtype | None = None) -> Checkpoint:
    """`base` with `paths` merged in order; `dtype` is the output dtype the merge casts to (default:
    each tensor's own)."""
    if not paths:
        return base
    bound = bind_all(base, paths)
    fmt = base.spec.format(base.format)
    steps = expand_format(base.spec, fmt, base.config, base.info.get("params"))
    stored = match_source(base, fmt, steps)
    by_key = {stored[s.key]: s for s in steps}
    touched = {name for b in bound for name in b.touches}
    adapted = {k for k, s in by_key.items() if touched.intersection(s.sources)}
    read = base.read

    def merged(key: str) -> torch.Tensor:
        tensor = read(key)
        if key not in adapted:
            return tensor
        step = by_key[key]
        parts = step.chain.inverse([tensor], step.trace)
        canonical = {n: p.to(torch.float32, copy=True) for n, p in zip(step.sources, parts)}
        for b in bound:
            b.apply(canonical)
        (out,) = step.chain.forward([canonical[n] for n in step.sources])
        return out.to(dtype or tensor.dtype)

    # an adapted tensor's bytes are no longer the file's: no start offset, so no kernel copy
    tensors = {k: dataclasses.replace(m, start=None, end=None) if k in adapted and getattr(m, "start", None)
               is not None else m for k, m in base.tensors.items()}
    info = {**base.info, "adapters": [str(b.adapter.path) for b in bound]}
    return dataclasses.replace(base, tensors=tensors, read=merged, info=info)
