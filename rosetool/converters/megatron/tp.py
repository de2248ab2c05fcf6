"""Tensor-parallel cut rules: how one global tensor is shared out across TP ranks and put back.

The rule comes from the `tp:` value of a spec entry (vocabulary documented in specs/llama.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import RosetoolError
from ...mappings import expr


@dataclass(frozen=True)
class TPRule:
    dim: int | None = None     # None: replicated
    parts: int = 1             # interleaved blocks along dim ([gate; up] -> 2)
    whole: int | None = None   # groups along dim that a rank must get whole (query groups, MLA heads)

    def check(self, tp: int, key: str) -> None:
        if self.whole is not None and self.whole % tp:
            raise RosetoolError(f"{key}: {self.whole} query groups cannot be split over TP={tp}")

    def shard_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(shape)
        out = list(shape)
        out[self.dim] //= tp
        return tuple(out)

    def fits(self, shape: tuple[int, ...], tp: int) -> bool:
        return self.dim is None or shape[self.dim] % (tp * self.parts) == 0

    def split(self, tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
        """Rank r's shard, for every r: views where one block is cut (the writer copies their bytes
        out as they are), copies where interleaved blocks must be joined; replicated tensors are shared."""
        if self.dim is None:
            return [tensor] * tp
        if self.parts == 1:
            return list(tensor.chunk(tp, self.dim))
        blocks = [b.chunk(tp, self.dim) for b in tensor.chunk(self.parts, self.dim)]
        return [torch.cat([b[r] for b in blocks], self.dim) for r in range(tp)]

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        if self.dim is None:
            return shards[0]
        per_rank = [s.chunk(self.parts, self.dim) for s in shards]
        return torch.cat([p[j] for j in range(self.parts) for p in per_rank], self.dim)


_NAMED = {None: TPRule(), "replicated": TPRule(), "column": TPRule(0), "row": TPRule(1)}


def parse_rule(raw: Any, env: Mapping[str, Any]) -> TPRule:
    if isinstance(raw, str) or raw is None:
        if raw not in _NAMED:
            raise RosetoolError(f"unknown tp rule {raw!r}; use column, row, replicated or {{dim, parts, whole}}")
        return _NAMED[raw]
    whole = raw.get("whole")
    return TPRule(int(expr.evaluate(raw.get("dim", 0), env)), int(expr.evaluate(raw.get("parts", 1), env)),
                  None if whole is None else int(expr.evaluate(whole, env)))
