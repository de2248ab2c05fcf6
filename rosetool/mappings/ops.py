"""Pure, invertible tensor ops that turn canonical tensors into one format's tensor.

Each op maps a list of tensors to a list of tensors (`concat` takes many and gives one, `split` the
reverse). `inverse` needs the shapes the op saw going forward; `Chain.trace` gets them by running the
chain on meta tensors, so the same code plans shapes and moves data, and one spec drives both
directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .expr import evaluate

Tensors = list[torch.Tensor]
Shapes = list[torch.Size]


@dataclass(frozen=True)
class Transpose:
    """Swap two dims (default the two of a matrix): Conv1D [in, out] <-> Linear [out, in]."""
    dims: tuple[int, int] = (0, 1)

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].transpose(*self.dims)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0].transpose(*self.dims)]


@dataclass(frozen=True)
class Concat:
    """Fuse several tensors along a dim (q/k/v -> qkv, gate/up -> gate_up)."""
    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        return [torch.cat(xs, dim=self.dim)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        sizes = [s[self.dim] for s in in_shapes]
        return list(torch.split(ys[0], sizes, dim=self.dim))


@dataclass(frozen=True)
class Split:
    """Cut one tensor into equal parts or given sizes along a dim."""
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    parts: int | None = None

    def forward(self, xs: Tensors) -> Tensors:
        if self.sizes is not None:
            return list(torch.split(xs[0], list(self.sizes), dim=self.dim))
        return list(torch.chunk(xs[0], self.parts, dim=self.dim))

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [torch.cat(ys, dim=self.dim)]


@dataclass(frozen=True)
class Reshape:
    """View with a new shape (head-major views for QKV interleaves); -1 is allowed once."""
    shape: tuple[int, ...]

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].reshape(self.shape)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0].reshape(in_shapes[0])]


@dataclass(frozen=True)
class Permute:
    """Reorder dims; paired with Reshape it expresses any head interleave."""
    dims: tuple[int, ...]

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].permute(self.dims)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        back = sorted(range(len(self.dims)), key=self.dims.__getitem__)
        return [ys[0].permute(back)]


@dataclass(frozen=True)
class Pad:
    """Pad a dim with zeros up to `size` (padded vocabularies); the inverse trims back."""
    size: int
    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        x = xs[0]
        extra = self.size - x.shape[self.dim]
        if extra < 0:
            raise ValueError(f"cannot pad dim {self.dim} of size {x.shape[self.dim]} down to {self.size}")
        if extra == 0:
            return [x]
        pad_shape = list(x.shape)
        pad_shape[self.dim] = extra
        return [torch.cat([x, x.new_zeros(pad_shape)], dim=self.dim)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0].narrow(self.dim, 0, in_shapes[0][self.dim])]


Op = Transpose | Concat | Split | Reshape | Permute | Pad


def _ints(value: Any, env: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(evaluate(v, env)) for v in value)


# name -> (builder from the YAML argument, kind of argument), used by spec validation too.
OP_BUILDERS: dict[str, Callable[[Any, Mapping[str, Any]], Op]] = {
    "transpose": lambda a, env: Transpose(_ints(a, env) if a is not None else (0, 1)),
    "concat": lambda a, env: Concat(int(evaluate(a if a is not None else 0, env))),
    "split": lambda a, env: Split(int(evaluate(a.get("dim", 0), env)),
                                  _ints(a["sizes"], env) if "sizes" in a else None,
                                  int(evaluate(a["parts"], env)) if "parts" in a else None),
    "reshape": lambda a, env: Reshape(_ints(a, env)),
    "permute": lambda a, env: Permute(_ints(a, env)),
    "pad": lambda a, env: Pad(int(evaluate(a["size"], env)), int(evaluate(a.get("dim", 0), env))),
}


def build_op(raw: str | Mapping[str, Any], env: Mapping[str, Any]) -> Op:
    """`transpose` or `{concat: 0}` style YAML -> an op with its expressions evaluated."""
    name, arg = (raw, None) if isinstance(raw, str) else next(iter(raw.items()))
    return OP_BUILDERS[name](arg, env)


@dataclass(frozen=True)
class Chain:
    """Ops applied in order from canonical tensors to a format tensor."""
    ops: tuple[Op, ...]

    def forward(self, xs: Sequence[torch.Tensor]) -> Tensors:
        out = list(xs)
        for op in self.ops:
            out = op.forward(out)
        return out

    def trace(self, shapes: Sequence[torch.Size], dtype: torch.dtype = torch.float32) -> list[Shapes]:
        """Shapes entering each op, found by running the chain on meta tensors (no data, no memory)."""
        xs = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
        seen: list[Shapes] = []
        for op in self.ops:
            seen.append([x.shape for x in xs])
            xs = op.forward(xs)
        seen.append([x.shape for x in xs])
        return seen

    def inverse(self, ys: Sequence[torch.Tensor], trace: list[Shapes]) -> Tensors:
        out = list(ys)
        for op, in_shapes in zip(reversed(self.ops), reversed(trace[:-1])):
            out = op.inverse(out, in_shapes)
        return out
