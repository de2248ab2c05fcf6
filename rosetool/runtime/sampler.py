"""Token selection on the model's device, one row per sequence that needs a next token.

Order: penalties, then greedy argmax or (temperature, top-k, top-p, min-p, draw). Draws use the
exponential race (argmax of p / Exp(1)) so each seeded row consumes only its own generator and a
seeded request repeats exactly whatever else shares its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rosetool.runtime.sequence import Sequence


def _pad(rows: list[list[int]], fill: int, device: torch.device) -> Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], device=device)


def apply_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """Repetition (CTRL/HF style, over prompt and output), frequency and presence (OpenAI style,
    over output only): `l/r if l > 0 else l*r`, then `l - f*count - p*(count > 0)`."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    picked = [seqs[i] for i in rows]
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    out_ids = _pad([s.output_token_ids for s in picked], vocab, device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=counts.dtype))
    counts = counts[:, :vocab]
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, _pad([s.token_ids for s in picked], vocab, device), True)
    seen = seen[:, :vocab]

    def column(name: str) -> Tensor:
        return torch.tensor([[getattr(s.params, name)] for s in picked], device=device,
                            dtype=logits.dtype)

    rep = column("repetition_penalty")
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    logits = logits.clone()
    logits[rows] = sub
    return logits


def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask to -inf everything outside top-k, then outside the top-p nucleus of what is left
    (renormalised, as HF's warpers chain), then below `min_p * max prob`. The best token always stays."""
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    remove = rank[None, :] >= top_k[:, None]
    kept = probs.masked_fill(remove, 0.0)
    kept = kept / kept.sum(-1, keepdim=True)
    remove |= ((kept.cumsum(-1) - kept) >= top_p[:, None]) & (top_p[:, None] < 1)
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def draw(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device,
                                      dtype=probs.dtype).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(-1)


def sample(logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
    """Pick one token per row; return them with the chosen tokens' logprobs under the raw model
    distribution (None where the request did not ask for logprobs)."""
    logits = logits.float()
    processed = apply_penalties(logits, seqs)
    tokens = processed.argmax(-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        tokens[random_rows] = _sample_rows(processed[random_rows], [seqs[i] for i in random_rows])
    logprobs: list[float | None] = [None] * len(seqs)
    if any(s.params.logprobs for s in seqs):
        chosen = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0].tolist()
        logprobs = [lp if s.params.logprobs else None for lp, s in zip(chosen, seqs)]
    return tokens.tolist(), logprobs


def _sample_rows(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    device, vocab = logits.device, logits.shape[1]
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    logits = logits / temperature[:, None]
    if any(s.params.top_k > 0 or s.params.top_p < 1 or s.params.min_p > 0 for s in seqs):
        top_k = torch.tensor([min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in seqs],
                             device=device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
        logits = filter_logits(logits, top_k, top_p, min_p)
    return draw(logits.softmax(-1), [s.generator for s in seqs])
