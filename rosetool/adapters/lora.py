"""LoRA weights bound to a base model: checked against its tensors, mapped through its spec.

An adapter is read in the key space of the format it was trained in (HF module names for PEFT,
`linear_qkv`-style names for Megatron) and bound to the base's spec, so each adapted tensor is one
spec step: the step's inverse ops carry a delta (merging) or the B factors (converting) to canonical
tensors, and another format's forward ops carry them on. Bad adapters fail here, before any base
tensor is read, with the file and tensor named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import CheckpointError, RosetoolError
from ..mappings.ops import Chain, Concat, GroupConcat, Pad, PairTail, Permute, Reshape, Split, Transpose
from ..converters.plan import Step, expand_format
from ..converters.sources import Checkpoint


@dataclass(frozen=True)
class Stored:
    """A tensor named in an adapter file: its shape now, its data when a merge or conversion needs it."""
    name: str
    file: Path
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Scale:
    """How a pair is scaled: PEFT's alpha / r, rsLoRA's alpha / sqrt(r) (Megatron-Bridge: alpha / dim).
    Kept as alpha and r, not their quotient, so writing it back gives the same float."""
    alpha: float
    rank: int
    rslora: bool = False

    @property
    def value(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass
class Pair:
    """delta = scale * B @ A, with A [rank, in] and B [out, rank] in the Linear view of the tensor
    (for a transposed format tensor, GPT-2's Conv1D, the delta is transposed)."""
    a: Stored | torch.Tensor
    b: Stored | torch.Tensor
    scale: Scale

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x if isinstance(x, torch.Tensor) else x.load() for x in (self.a, self.b))


@dataclass
class Adapter:
    """LoRA pairs keyed by the format tensor they adapt, and whole replacements (PEFT's
    `modules_to_save`), as read from one adapter folder."""
    path: Path
    format: str                                   # hf, megatron, megatron_te
    pairs: dict[str, list[Pair]]
    replace: dict[str, Stored] = field(default_factory=dict)
    transposed: bool = False                      # PEFT fan_in_fan_out: format tensors are [in, out]
    peft_config: dict[str, Any] | None = None     # the PEFT config it came from, written back on export


def _shape(x: Stored | torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _where(x: Stored | torch.Tensor, adapter: Adapter) -> str:
    return f"{x.file}: tensor {x.name!r}" if isinstance(x, Stored) else f"{adapter.path}"


@dataclass
class Bound:
    """An adapter checked against one base: every key is a step of the base's spec in the adapter's
    format, with the right shape."""
    adapter: Adapter
    steps: dict[str, Step]                 # adapted format key -> its step
    touches: dict[str, list[str]]          # canonical tensor -> adapted format keys made from it

    def deltas(self, key: str) -> dict[str, torch.Tensor]:
        """Canonical tensor -> the fp32 delta this key's pairs add to it (dense, exact ops)."""
        step = self.steps[key]
        delta = None
        for pair in self.adapter.pairs[key]:
            a, b = pair.tensors()
            d = (b.float() @ a.float()) * pair.scale.value      # peft's order: (B @ A) * scaling
            delta = d if delta is None else delta + d
        if self.adapter.transposed:
            delta = delta.T
        return dict(zip(step.sources, step.chain.inverse([delta], step.trace)))

    def replacements(self, key: str) -> dict[str, torch.Tensor]:
        step = self.steps[key]
        return dict(zip(step.sources, step.chain.inverse([self.adapter.replace[key].load().float()], step.trace)))

    def apply(self, canonical: dict[str, torch.Tensor]) -> None:
        """Merge into fp32 canonical tensors in place: replacements first, then deltas. A key that also
        feeds canonical tensors outside `canonical` (another group) is computed again there."""
        keys = sorted({k for name in canonical for k in self.touches.get(name, ())})
        for key in (k for k in keys if k in self.adapter.replace):
            for name, value in self.replacements(key).items():
                if name in canonical:
                    canonical[name] = value.clone()
        for key in (k for k in keys if k in self.adapter.pairs):
            for name, value in self.deltas(key).items():
                if name in canonical:
                    canonical[name] += value


def bind(adapter: Adapter, base: Checkpoint) -> Bound:
    """Check every adapted key against the base: it must exist, and the delta must have its shape."""
    spec, config = base.spec, base.config
    params = base.info.get("params") if base.format == adapter.format else None
    steps = {s.key: s for s in expand_format(spec, spec.format(adapter.format), config, params)}
    ours: dict[str, Step] = {}
    for key, pairs in adapter.pairs.items():
        step = _step_for(key, steps, adapter, pairs[0].a, base)
        if len(step.shape) != 2:
            raise CheckpointError(f"{_where(pairs[0].a, adapter)} adapts {key!r}, a {len(step.shape)}-d tensor; "
                                  f"LoRA adapts 2-d weights only")
        out, inp = (step.shape[1], step.shape[0]) if adapter.transposed else step.shape
        for pair in pairs:
            a, b = _shape(pair.a), _shape(pair.b)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise CheckpointError(f"{_where(pair.b, adapter)}: rank mismatch: lora_B is {list(b)}, its lora_A "
                                      f"{list(a)} (B's columns must equal A's rows)")
            if (b[0], a[1]) != (out, inp):
                raise CheckpointError(f"{_where(pair.b, adapter)}: adapter for a base of another shape: B @ A is "
                                      f"{[b[0], a[1]]}, base tensor {key!r} is {list(step.shape)} in {base.path}")
        ours[key] = step
    for key, stored in adapter.replace.items():
        step = _step_for(key, steps, adapter, stored, base)
        if tuple(stored.shape) != step.shape:
            raise CheckpointError(f"{stored.file}: tensor {stored.name!r} (modules_to_save) is {list(stored.shape)}, "
                                  f"base tensor {key!r} is {list(step.shape)} in {base.path}")
        ours[key] = step
    touches: dict[str, list[str]] = {}
    for key, step in ours.items():
        for name in step.sources:
            touches.setdefault(name, []).append(key)
    return Bound(adapter, ours, touches)


def _step_for(key: str, steps: dict[str, Step], adapter: Adapter, x: Stored | torch.Tensor, base: Checkpoint) -> Step:
    if key not in steps:
        raise CheckpointError(f"{_where(x, adapter)} adapts {key!r}, which the base {base.path} "
                              f"({base.spec.name}) does not have")
    return steps[key]


# --- factor mapping: B's rows move through a step's ops like the weight's rows, A is untouched --------

_ROW_OPS = (Concat, Split, GroupConcat, Pad, PairTail, Reshape, Permute)


def _row_only(step: Step, transposed: bool) -> tuple[Chain, list]:
    """The step's ops as row moves of a [out, in] weight (a trailing transpose is the Conv1D view), or a
    refusal naming the op that would mix A's side in."""
    ops, trace = list(step.chain.ops), list(step.trace)
    if transposed:
        if not ops or not isinstance(ops[-1], Transpose):
            raise RosetoolError(f"{step.key}: fan_in_fan_out adapter on a tensor stored [out, in]")
        ops, trace = ops[:-1], trace[:-1]
    width = trace[0][0][-1]
    for op, shapes in zip(ops, trace[1:]):
        moves_rows = isinstance(op, _ROW_OPS) and getattr(op, "dim", 0) == 0 and all(s[-1] == width for s in shapes) \
            and (not isinstance(op, Permute) or op.dims[-1] == len(op.dims) - 1)
        if not moves_rows:
            raise RosetoolError(f"{step.key}: its layout op {type(op).__name__} mixes input columns; LoRA factors "
                                f"cannot be mapped through it (merge the adapter instead)")
    return Chain(tuple(ops)), trace


def move_rows(fn: Callable[[list[torch.Tensor]], list[torch.Tensor]], mats: list[torch.Tensor],
              width: int) -> list[torch.Tensor]:
    """Apply row moves written for [rows, width] weights to [rows, rank] factors: columns go through
    in chunks of `width`, zero-padded, so every op is the spec's own and every value is copied exactly."""
    rank = mats[0].shape[1]
    chunks = []
    for start in range(0, rank, width):
        n = min(width, rank - start)
        padded = [torch.nn.functional.pad(m[:, start:start + n], (0, width - n)) for m in mats]
        chunks.append([o[:, :n] for o in fn(padded)])
    return [torch.cat(parts, 1) for parts in zip(*chunks)]


@dataclass
class CanonicalPair:
    """A pair on one canonical tensor: A as trained, B cut to the canonical tensor's rows."""
    a: torch.Tensor
    b: torch.Tensor
    scale: Scale


def to_canonical(bound: Bound) -> dict[str, list[CanonicalPair]]:
    """Every pair split onto the canonical tensors its step fuses (A shared). A canonical slice of B
    that is all zeros adds nothing and is dropped: that is how a block-diagonal fused B comes apart."""
    if bound.adapter.replace:
        key = next(iter(bound.adapter.replace))
        raise RosetoolError(f"{bound.adapter.path}: {key!r} is a whole replaced tensor (modules_to_save), which no "
                            f"Megatron LoRA layout holds; merge the adapter instead (--adapter without --adapters-only)")
    out: dict[str, list[CanonicalPair]] = {}
    for key, pairs in bound.adapter.pairs.items():
        step = bound.steps[key]
        chain, trace = _row_only(step, bound.adapter.transposed)
        width = trace[0][0][-1]
        for pair in pairs:
            a, b = pair.tensors()
            pieces = move_rows(lambda xs: chain.inverse(xs, trace), [b], width)
            for name, piece in zip(step.sources, pieces):
                if torch.count_nonzero(piece):
                    out.setdefault(name, []).append(CanonicalPair(a, piece.contiguous(), pair.scale))
    return out


@dataclass
class FusedPair:
    """One format tensor's adapter: A [R, in], B [out, R], and the scale of each block of R's rows."""
    a: torch.Tensor
    b: torch.Tensor
    blocks: list[tuple[int, Scale]]          # (rows of A in this block, its scale), in order


def from_canonical(canonical: dict[str, list[CanonicalPair]], steps: list[Step],
                   transposed: bool = False) -> dict[str, FusedPair]:
    """Canonical pairs onto another format's fused tensors. Exact either way: pairs sharing one A (a
    PEFT c_attn, a Megatron linear_qkv) keep it shared and stack their B rows; distinct A's are
    concatenated and B made block-diagonal (B_bd @ A_cat = [B_q A_q; B_k A_k; ...])."""
    out: dict[str, FusedPair] = {}
    for step in steps:
        found = [canonical.get(name, []) for name in step.sources]
        if not any(found):
            continue
        chain, trace = _row_only(step, transposed)
        width, rows = trace[0][0][-1], [s[0] for s in trace[0]]
        present = [p for ps in found for p in ps]
        first = present[0]
        shared = all(len(ps) <= 1 for ps in found) and all(
            p.scale == first.scale and (p.a is first.a or torch.equal(p.a, first.a)) for p in present)
        if shared:
            a = first.a
            bs = [ps[0].b if ps else first.b.new_zeros(n, first.b.shape[1]) for ps, n in zip(found, rows)]
            blocks = [(a.shape[0], first.scale)]
        else:
            a = torch.cat([p.a for p in present])
            total, offset, bs = a.shape[0], 0, []
            for ps, n in zip(found, rows):
                b = first.b.new_zeros(n, total)
                for p in ps:
                    b[:, offset:offset + p.a.shape[0]] = p.b
                    offset += p.a.shape[0]
                bs.append(b)
            blocks = [(p.a.shape[0], p.scale) for p in present]
        (b,) = move_rows(lambda xs: chain.forward(xs), bs, width)
        out[step.key] = FusedPair(a.contiguous(), b.contiguous(), blocks)
    return out
