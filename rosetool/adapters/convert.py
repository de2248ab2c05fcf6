"""Convert an adapter between HF PEFT and Megatron layouts (`--adapters-only`), through canonical tensors.

Exactness: every value is copied, never recomputed. HF -> Megatron: q/k/v (gate/up) adapters with
their own A become one fused adapter, A concatenated and B block-diagonal (exact: B_bd @ A_cat stacks
each B @ A); adapters that share A (GPT-2's c_attn) keep it shared. Megatron -> HF: each block goes
back to its own HF module (a fused B's zero blocks drop out), and a Megatron-trained fused adapter
with one A gives every HF module that A and its rows of B (exact too). HF -> Megatron -> HF is
bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..converters.megatron.layout import SINGLE, Layout
from ..converters.outdir import atomic_output
from ..converters.plan import expand_format
from ..converters.sources import Checkpoint
from ..errors import RosetoolError
from ..mappings.ops import Transpose
from .lora import bind, from_canonical, to_canonical
from .megatron_io import megatron_steps, write_megatron_adapter
from .open import open_adapter
from .peft_io import write_peft


@dataclass
class AdapterResult:
    src: str
    dst: str
    src_format: str
    dst_format: str
    architecture: str
    num_tensors: int
    seconds: float


def convert_adapter(base: Checkpoint, adapter: str | Path, dst: str | Path, to: str, force: bool = False,
                    layout: Layout = SINGLE) -> AdapterResult:
    """`adapter` (on `base`) in format `to`: `hf` writes a PEFT folder, a Megatron format rank files."""
    start = time.perf_counter()
    bound = bind(open_adapter(adapter, base), base)
    if bound.adapter.format == to or (bound.adapter.format.startswith("megatron") and to.startswith("megatron")):
        raise RosetoolError(f"{adapter} is already a {bound.adapter.format} adapter")
    canonical = to_canonical(bound)
    spec = base.spec
    with atomic_output(Path(dst), force, Path(adapter)) as tmp:
        if to == "hf":
            conv1d = _conv1d(base)
            fused = from_canonical(canonical, expand_format(spec, spec.format("hf"), base.config), conv1d)
            n = write_peft(tmp, fused, str(base.path), conv1d, bound.adapter.peft_config)
        elif to in ("megatron", "megatron_te"):
            steps, _ = megatron_steps(base, to, layout.tp)
            fused = from_canonical(canonical, steps)
            n = write_megatron_adapter(tmp, base, fused, to, layout, bound.adapter.peft_config)
        else:
            raise RosetoolError(f"adapters convert to hf, megatron or megatron_te, not {to}")
    return AdapterResult(str(adapter), str(dst), bound.adapter.format, to, spec.name, n,
                         time.perf_counter() - start)


def _conv1d(base: Checkpoint) -> bool:
    """HF layers stored [in, out] (GPT-2's Conv1D): PEFT marks their adapters fan_in_fan_out."""
    steps = expand_format(base.spec, base.spec.format("hf"), base.config)
    return any(s.chain.ops and isinstance(s.chain.ops[-1], Transpose) for s in steps)
