"""Pure, invertible tensor ops that turn canonical tensors into one format's tensor.

Each op maps a list of tensors to a list of tensors (`concat` takes many and gives one, `split` the
reverse). `inverse` needs the shapes the op saw going forward; `Chain.trace` computes them from the
canonical shapes before any data moves (shape arithmetic, not meta tensors, which cost seconds of
lazy imports), so plans are checked up front and one spec drives both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..lazy_torch import torch
from .expr import evaluate

Tensors = list["torch.Tensor"]
Shapes = list["torch.Size"]


@dataclass(frozen=True)
class Transpose:
    """Swap two dims (default the two of a matrix): Conv1D [in, out] <-> Linear [out, in]."""
    dims: tuple[int, int] = (0, 1)

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].transpose(*self.dims)]

    def shapes(self, s: Shapes) -> Shapes:
        out = list(s[0])
        a, b = self.dims
        out[a], out[b] = out[b], out[a]
        return [torch.Size(out)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0].transpose(*self.dims)]


@dataclass(frozen=True)
class Concat:
    """Fuse several tensors along a dim (q/k/v -> qkv, gate/up -> gate_up)."""
    dim: int = 0

    def forward(self, xs: Tensors) -> Tensors:
        return [torch.cat(xs, dim=self.dim)]

    def shapes(self, s: Shapes) -> Shapes:
        rest = {x[:self.dim] + x[self.dim + 1:] for x in s}
        if len(rest) != 1:
            raise ValueError(f"concat along dim {self.dim} of mismatched shapes {[list(x) for x in s]}")
        out = list(s[0])
        out[self.dim] = sum(x[self.dim] for x in s)
        return [torch.Size(out)]

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

    def shapes(self, s: Shapes) -> Shapes:
        total = s[0][self.dim]
        sizes = self.sizes or ((total // self.parts,) * self.parts if self.parts and total % self.parts == 0 else None)
        if sizes is None or sum(sizes) != total:
            raise ValueError(f"cannot split dim {self.dim} of size {total} into {self.sizes or self.parts}")
        return [torch.Size(s[0][:self.dim] + (n,) + s[0][self.dim + 1:]) for n in sizes]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [torch.cat(ys, dim=self.dim)]


@dataclass(frozen=True)
class Reshape:
    """View with a new shape (head-major views for QKV interleaves); -1 is allowed once."""
    shape: tuple[int, ...]

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].reshape(self.shape)]

    def shapes(self, s: Shapes) -> Shapes:
        numel, known = math.prod(s[0]), math.prod(d for d in self.shape if d != -1)
        out = tuple(numel // known if d == -1 else d for d in self.shape)
        if math.prod(out) != numel or list(self.shape).count(-1) > 1:
            raise ValueError(f"cannot reshape {list(s[0])} to {list(self.shape)}")
        return [torch.Size(out)]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0].reshape(in_shapes[0])]


@dataclass(frozen=True)
class Permute:
    """Reorder dims; paired with Reshape it expresses any head interleave."""
    dims: tuple[int, ...]

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0].permute(self.dims)]

    def shapes(self, s: Shapes) -> Shapes:
        if sorted(self.dims) != list(range(len(s[0]))):
            raise ValueError(f"permute {list(self.dims)} does not fit shape {list(s[0])}")
        return [torch.Size(s[0][d] for d in self.dims)]

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

    def shapes(self, s: Shapes) -> Shapes:
        if s[0][self.dim] > self.size:
            raise ValueError(f"cannot pad dim {self.dim} of size {s[0][self.dim]} down to {self.size}")
        return [torch.Size(s[0][:self.dim] + (self.size,) + s[0][self.dim + 1:])]


@dataclass(frozen=True)
class GroupConcat:
    """Fuse several tensors group by group along dim 0: Megatron's QKV rows are [q_g; k_g; v_g] per
    query group g, which no single reshape/permute of [q; k; v] gives when q has more heads than k."""
    groups: int

    def forward(self, xs: Tensors) -> Tensors:
        out = torch.cat([x.reshape(self.groups, -1, *x.shape[1:]) for x in xs], dim=1)
        return [out.reshape(-1, *out.shape[2:])]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        y = ys[0].reshape(self.groups, -1, *ys[0].shape[1:])
        parts = torch.split(y, [s[0] // self.groups for s in in_shapes], dim=1)
        return [p.reshape(s) for p, s in zip(parts, in_shapes)]

    def shapes(self, s: Shapes) -> Shapes:
        if any(x[0] % self.groups or x[1:] != s[0][1:] for x in s):
            raise ValueError(f"group_concat of {[list(x) for x in s]} into {self.groups} groups")
        return [torch.Size((sum(x[0] for x in s),) + tuple(s[0][1:]))]


@dataclass(frozen=True)
class Stack:
    """Experts -> one fused tensor: the inputs come expert-major (`parts` per expert, e.g. gate_e, up_e),
    each expert's parts are concatenated along dim 0 and the experts stacked along a new dim 0, giving
    the runtime's [E, 2*ffn, hidden]. In bytes this is the inputs laid end to end, which is what lets
    the executor write it expert by expert."""
    parts: int = 1

    def forward(self, xs: Tensors) -> Tensors:
        return [torch.stack([torch.cat(xs[e:e + self.parts]) for e in range(0, len(xs), self.parts)])]

    def shapes(self, s: Shapes) -> Shapes:
        if not s or len(s) % self.parts or len({x[1:] for x in s}) != 1:
            raise ValueError(f"stack of {[list(x) for x in s]} in groups of {self.parts}")
        rows = {sum(x[0] for x in s[e:e + self.parts]) for e in range(0, len(s), self.parts)}
        if len(rows) != 1:
            raise ValueError(f"stack of experts with different shapes {[list(x) for x in s]}")
        return [torch.Size((len(s) // self.parts, rows.pop()) + tuple(s[0][1:]))]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        per_expert = [x[0] for x in in_shapes[:self.parts]]
        return [part for expert in ys[0].unbind(0) for part in torch.split(expert, per_expert)]


@dataclass(frozen=True)
class PairTail:
    """Within each of `blocks` equal row blocks of dim 0, reorder the last `size` rows from halves
    [a_0 .. a_n-1, b_0 .. b_n-1] to pairs [a_0, b_0, a_1, b_1, ..]: a rotate-half RoPE's rows laid out for a
    kernel that rotates neighbouring pairs (DeepSeek-V3 with rope_interleave false -> megatron-core's MLA).
    `size` 0 leaves the tensor as it is."""
    blocks: int
    size: int

    def _order(self, rows: int, inverse: bool) -> "torch.Tensor":
        per_block, half = rows // self.blocks, self.size // 2
        tail = torch.arange(self.size).view(2, half).t().reshape(-1)
        if inverse:
            tail = tail.argsort()
        block = torch.cat([torch.arange(per_block - self.size), per_block - self.size + tail])
        return (torch.arange(self.blocks)[:, None] * per_block + block).reshape(-1)

    def forward(self, xs: Tensors) -> Tensors:
        return [xs[0] if not self.size else xs[0].index_select(0, self._order(xs[0].shape[0], False))]

    def shapes(self, s: Shapes) -> Shapes:
        rows = s[0][0]
        if rows % self.blocks or self.size % 2 or self.size > rows // self.blocks:
            raise ValueError(f"pair_tail of {self.size} rows in {self.blocks} blocks does not fit shape {list(s[0])}")
        return [s[0]]

    def inverse(self, ys: Tensors, in_shapes: Shapes) -> Tensors:
        return [ys[0] if not self.size else ys[0].index_select(0, self._order(ys[0].shape[0], True))]


Op = Transpose | Concat | Split | Reshape | Permute | Pad | GroupConcat | Stack | PairTail


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
    "group_concat": lambda a, env: GroupConcat(int(evaluate(a, env))),
    "pad": lambda a, env: Pad(int(evaluate(a["size"], env)), int(evaluate(a.get("dim", 0), env))),
    "stack": lambda a, env: Stack(int(evaluate(a if a is not None else 1, env))),
    "pair_tail": lambda a, env: PairTail(int(evaluate(a["blocks"], env)), int(evaluate(a["size"], env))),
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

    def trace(self, shapes: Sequence[torch.Size]) -> list[Shapes]:
        """Shapes entering each op and leaving the last, computed without touching data."""
        seen: list[Shapes] = [[torch.Size(s) for s in shapes]]
        for op in self.ops:
            seen.append(op.shapes(seen[-1]))
        return seen

    def inverse(self, ys: Sequence[torch.Tensor], trace: list[Shapes]) -> Tensors:
        out = list(ys)
        for op, in_shapes in zip(reversed(self.ops), reversed(trace[:-1])):
            out = op.inverse(out, in_shapes)
        return out
