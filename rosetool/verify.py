"""Logit parity between two checkpoints of any formats.

HF folders run through transformers (the reference nobody here wrote); everything else runs through
rosetool's runtime model. Both see the same random token batch; the verdict is max |logit diff|
against a tolerance scaled by dtype and by the logits' own magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .converters.sources import detect_format, resolve_source
from .errors import RosetoolError

# dtype -> (absolute, relative to max |logit|)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class VerifyResult:
    a: str
    b: str
    runner_a: str
    runner_b: str
    dtype: str
    tokens: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    tolerance: float
    greedy_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def load_forward(path_or_id: str, dtype: torch.dtype, device: str) -> tuple[Forward, int, int, str]:
    """-> (tokens -> logits, vocab size, max positions, runner name)."""
    path = resolve_source(path_or_id)
    if detect_format(path) == "hf":
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
    from .runtime.model import load_model
    model, _ = load_model(path, dtype, device)
    return model, model.args.vocab_size, model.args.max_position_embeddings, "rosetool"


def verify(a: str, b: str, dtype: torch.dtype = torch.float32, device: str = "cpu", batch: int = 2,
           seq_len: int = 32, seed: int = 0, atol: float | None = None) -> VerifyResult:
    fa, va, pa, ra = load_forward(a, dtype, device)
    fb, vb, pb, rb = load_forward(b, dtype, device)
    if va != vb:
        raise RosetoolError(f"vocabulary sizes differ: {a} has {va}, {b} has {vb}")
    seq_len = min(seq_len, pa, pb)
    tokens = torch.randint(0, va, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        la, lb = fa(tokens).float(), fb(tokens).float()
    diff = (la - lb).abs()
    scale = la.abs().max().item()
    tol_abs, tol_rel = TOLERANCES[dtype]
    tol = atol if atol is not None else tol_abs + tol_rel * scale
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    return VerifyResult(str(a), str(b), ra, rb, str(dtype).removeprefix("torch."), [batch, seq_len],
                        diff.max().item(), diff.mean().item(), scale, tol, agree, diff.max().item() <= tol)
