"""Run a plan: per group, read the source tensors, undo their ops into canonical tensors, apply the
target's ops, hand each result to a sink. Only one group is alive at a time."""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .plan import Plan
from .sources import Checkpoint


class Sink(Protocol):
    def write(self, key: str, tensor: torch.Tensor) -> None: ...


def execute(plan: Plan, ckpt: Checkpoint, sink: Sink, dtype: torch.dtype | None = None,
            on_tensor: Callable[[int], None] | None = None) -> None:
    for group in plan.groups:
        canonical: dict[str, torch.Tensor] = {}
        for step in group.reads:
            tensor = ckpt.read(plan.source_keys[step.key])
            canonical.update(zip(step.sources, step.chain.inverse([tensor], step.trace)))
        for step in group.writes:
            (out,) = step.chain.forward([canonical[s] for s in step.sources])
            if dtype is not None:
                out = out.to(dtype)
            sink.write(step.key, out)
            if on_tensor:
                on_tensor(out.numel() * out.element_size())
