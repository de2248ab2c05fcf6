"""The mixture-of-experts feed-forward layer, in the native layout (experts stacked [E, out, in]).

Routing follows Mixtral / Qwen-MoE / OLMoE: softmax over all experts in fp32, top-k, optional
renormalisation of the k weights, weighted sum of the chosen experts; a shared expert, optionally
scaled by sigmoid(shared_gate(x)), is added on top.

Two expert kernels compute the same sum. `reference_experts` runs every token through every expert and
masks, which is plainly right and wasteful. `grouped_experts` sorts the (token, expert) pairs by
expert so each expert multiplies one contiguous batch, with `F.grouped_mm` where its 16-byte stride
rule holds (one call for all experts; it asks the host for nothing, so a CUDA graph should hold it,
though no GPU has run it yet) and a loop over experts (not tokens) elsewhere.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..canonical import ModelArgs

Activation = Callable[[torch.Tensor], torch.Tensor]


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights ([N, k] each); probabilities in fp32 as HF does."""
    probs = F.linear(x, router).float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


def reference_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, act: Activation) -> torch.Tensor:
    """Every token through every expert, scaled by its routing weight (zero where not chosen)."""
    dense = torch.zeros(x.shape[0], up.shape[0], dtype=x.dtype, device=x.device)
    dense.scatter_(1, experts, weights)
    out = torch.zeros_like(x)
    for e in range(up.shape[0]):
        gate, lin = F.linear(x, up[e]).chunk(2, dim=-1)
        out += dense[:, e, None] * F.linear(act(gate) * lin, down[e])
    return out


def _grouped_mm_fits(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """F.grouped_mm wants row strides of whole 16-byte units; on CUDA it takes bfloat16 on sm80+ only."""
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return False
    return all(n * x.element_size() % 16 == 0 for n in (up.shape[1], up.shape[2], down.shape[2]))


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, fits: bool) -> torch.Tensor:
    """Rows of x sorted by expert, expert e's rows ending at ends[e]; each block times w[e].T."""
    if fits:
        return F.grouped_mm(x, w.transpose(1, 2), offs=ends)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[e])
        start = end
    return out


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, act: Activation) -> torch.Tensor:
    """Each chosen (token, expert) pair computed once, batched by expert."""
    n, k = experts.shape
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(up.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    fits = _grouped_mm_fits(x, up, down)
    gate, lin = _grouped_linear(x[order // k], up, ends, fits).chunk(2, dim=-1)
    y = _grouped_linear(act(gate) * lin, down, ends, fits) * weights.flatten()[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(n, k, -1).sum(dim=1)


class StackedWeight(nn.Module):
    """One [E, out, in] tensor for all experts, held as `.weight` so native keys read `experts.up.weight`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        ffn = args.moe_intermediate_size
        self.up = StackedWeight(args.num_experts, 2 * ffn, args.hidden_size)    # expert e: [gate_e; up_e]
        self.down = StackedWeight(args.num_experts, args.hidden_size, ffn)


class MoE(nn.Module):
    """Router + experts (+ shared expert). `shared` is a dense GLU MLP the caller builds, so this module
    need not know the dense MLP's class; `kernel` picks the expert computation."""

    def __init__(self, args: ModelArgs, act: Activation, shared: nn.Module | None = None):
        super().__init__()
        self.top_k, self.renormalize, self.act = args.num_experts_per_tok, args.norm_topk_prob, act
        self.router = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args)
        self.shared = shared
        self.shared_gate = nn.Linear(args.hidden_size, 1, bias=False) if args.shared_expert_gate else None
        self.kernel = grouped_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = route(flat, self.router.weight, self.top_k, self.renormalize)
        out = self.kernel(flat, weights, experts, self.experts.up.weight, self.experts.down.weight, self.act)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.view_as(x)
