"""Logit parity between two checkpoints of any formats.

HF folders run through transformers (the reference nobody here wrote); everything else runs through
rosetool's runtime model. Both see the same random token batch; the verdict is max |logit diff|
against a tolerance scaled by dtype and by the logits' own magnitude. By default each checkpoint runs
at the dtype it stores and the tolerance is the lower precision's: a bf16 export of an fp32 model
differs from it by bf16 rounding, which is correct, not a failure.

When exactly one side is quantized (FP8, INT4, MXFP4) its weights differ from the other's by design, so
max |diff| says little: the verdict is then the per-position cosine of the logits (>= COSINE_PASS), with
max |diff| and top-1 agreement printed beside it. Two quantized sides compare at the usual tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .converters.megatron import is_megatron
from .converters.sources import detect_format, open_checkpoint, resolve_source
from .errors import RosetoolError

# dtype -> (absolute, relative to max |logit|)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}
COSINE_PASS = 0.99

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class VerifyResult:
    a: str
    b: str
    runner_a: str
    runner_b: str
    dtype: str          # the lower precision of the two: the one the tolerance follows
    dtype_a: str
    dtype_b: str
    tokens: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    tolerance: float
    greedy_agreement: float
    passed: bool
    vocab: int = 0      # logits compared per token: a Megatron side's padded rows are left out
    min_cosine: float = 1.0
    criterion: str = "max_abs_diff"   # or "cosine": one side quantized
    quantized: list[str] | None = None   # each side's quantization scheme, or None

    def to_dict(self) -> dict:
        return asdict(self)


def load_forward(path_or_id: str, dtype: torch.dtype, device: str,
                 adapters: tuple[str, ...] = ()) -> tuple[Forward, int, int, str]:
    """-> (tokens -> logits, vocab size, max positions, runner name). A model with adapters runs on
    rosetool's runtime, which merges them as it loads."""
    path = resolve_source(path_or_id)
    if detect_format(path) == "hf" and quant_scheme(path) is None and not adapters:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            # eager experts: the reference loop; the grouped_mm path refuses odd expert widths on CPU
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
            model = model.to(device).eval()
        except Exception as exc:
            raise RosetoolError(f"{path}: transformers cannot load it ({str(exc).splitlines()[0][:200]})") from None
        cfg = model.config
        return (lambda x: model(x).logits), cfg.vocab_size, getattr(cfg, "max_position_embeddings", None) \
            or getattr(cfg, "n_positions", 1024), "transformers"
    from .runtime.loader import load_model
    model, _ = load_model(path, dtype, device, adapters=adapters)
    scheme = quant_scheme(path)
    runner = "rosetool+lora" if adapters else "rosetool"
    return model, model.args.vocab_size, model.args.max_position_embeddings, \
        runner + (f", {scheme} dequantized exactly" if scheme else "")


def quant_scheme(path: Path) -> str | None:
    """A quantized HF folder runs on rosetool's runtime, dequantized by the published formula: transformers
    on CPU refuses partial FP8 edge blocks and several schemes."""
    quant = open_checkpoint(path).info.get("quant")
    return quant.scheme.label if quant else None


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype most of a checkpoint's tensors hold (read from headers, nothing loaded);
    float32 where it holds none the runtime computes in."""
    counts: dict[torch.dtype, int] = {}
    for t in open_checkpoint(path).tensors.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    held = [d for d in sorted(counts, key=counts.__getitem__, reverse=True) if d in TOLERANCES]
    return held[0] if held else torch.float32


def lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """bfloat16 < float16 < float32, ordered by the tolerance each needs."""
    return max(a, b, key=lambda d: TOLERANCES[d][0])


def verify(a: str, b: str, dtype: torch.dtype | None = None, device: str = "cpu", batch: int = 2,
           seq_len: int = 32, seed: int = 0, atol: float | None = None, adapters: tuple[str, ...] = ()) -> VerifyResult:
    """`dtype` None: each checkpoint at the dtype it stores; otherwise both cast to `dtype`. `adapters`
    are merged into A (the base of a fine-tune, checked against its merged export as B)."""
    path_a, path_b = resolve_source(a), resolve_source(b)   # both exist before either loads
    dtype_a = dtype or stored_dtype(path_a)
    dtype_b = dtype or stored_dtype(path_b)
    fa, va, pa, ra = load_forward(str(path_a), dtype_a, device, tuple(map(str, adapters)))
    fb, vb, pb, rb = load_forward(str(path_b), dtype_b, device)
    vocab = min(va, vb)
    if va != vb and not is_megatron(path_a if va > vb else path_b):
        raise RosetoolError(f"vocabulary sizes differ: {a} has {va}, {b} has {vb}")
    # else the larger is a Megatron checkpoint whose vocabulary is padded (to a multiple of 128 x TP) and that
    # records no HF size: its extra rows are padding, never a real token's logit
    seq_len = min(seq_len, pa, pb)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        la, lb = fa(tokens)[..., :vocab].float(), fb(tokens)[..., :vocab].float()
    diff = (la - lb).abs()
    scale = la.abs().max().item()
    low = lower_precision(dtype_a, dtype_b)
    tol_abs, tol_rel = TOLERANCES[low]
    tol = atol if atol is not None else tol_abs + tol_rel * scale
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(la, lb, dim=-1).min().item()
    schemes = [quant_scheme(path_a), quant_scheme(path_b)]
    lossy = (schemes[0] is None) != (schemes[1] is None)
    passed = cosine >= COSINE_PASS if lossy else diff.max().item() <= tol
    names = [str(d).removeprefix("torch.") for d in (low, dtype_a, dtype_b)]
    return VerifyResult(str(a), str(b), ra, rb, *names, [batch, seq_len],
                        diff.max().item(), diff.mean().item(), scale, tol, agree, passed, vocab, cosine,
                        "cosine" if lossy else "max_abs_diff", schemes if any(schemes) else None)
