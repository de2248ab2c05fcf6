"""The mixture-of-experts feed-forward layer, in the native layout (experts stacked [E, out, in]).

Routing follows Mixtral / Qwen-MoE / OLMoE: softmax over all experts in fp32, top-k, optional
renormalisation of the k weights, weighted sum of the chosen experts; a shared expert, optionally
scaled by sigmoid(shared_gate(x)), is added on top. DeepSeek adds sigmoid scores, a bias that steers
the choice but not the weights, group-limited choice and a scale on the routed sum (`Router`).

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


class Router(nn.Module):
    """Which k experts each token goes to, and with what weights. `choice_bias` (DeepSeek-V3's
    e_score_correction_bias) is added to the scores only to choose experts; the weights are the
    unbiased scores of the chosen ones."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.choice_bias = nn.Parameter(torch.empty(args.num_experts)) if args.router_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights ([N, k] each); scores in fp32 as HF computes them."""
        a = self.args
        logits = F.linear(x.float(), self.weight.float()) if a.router_fp32 else F.linear(x, self.weight).float()
        scores = logits.sigmoid() if a.router_scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.choice_bias is None else scores + self.choice_bias.float()
        if a.expert_groups > 1:
            choice = _best_groups(choice, a.expert_groups, a.topk_groups, a.group_score)
        experts = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if a.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if a.routed_scaling_factor != 1.0:
            weights = weights * a.routed_scaling_factor
        return weights.to(x.dtype), experts


def _best_groups(choice: torch.Tensor, groups: int, keep: int, score: str) -> torch.Tensor:
    """Hide (-inf) the experts outside each token's `keep` best groups of consecutive experts."""
    grouped = choice.view(choice.shape[0], groups, -1)
    group_scores = grouped.amax(dim=-1) if score == "max" else grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(keep, dim=-1).indices
    shown = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~shown[..., None], float("-inf")).flatten(1)


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


def _expert_rows(x: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                 up: torch.Tensor, down: torch.Tensor, act: Activation) -> torch.Tensor:
    """Pair i (token tokens[i] through expert experts[i], scaled by weights[i]) -> row i, batched by expert."""
    order = experts.argsort(stable=True)
    counts = torch.zeros(up.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    fits = _grouped_mm_fits(x, up, down)
    gate, lin = _grouped_linear(x[tokens[order]], up, ends, fits).chunk(2, dim=-1)
    y = _grouped_linear(act(gate) * lin, down, ends, fits) * weights[order, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, act: Activation) -> torch.Tensor:
    """Each chosen (token, expert) pair computed once, batched by expert."""
    n, k = experts.shape
    tokens = torch.arange(n * k, device=x.device) // k
    return _expert_rows(x, tokens, experts.flatten(), weights.flatten(), up, down, act).view(n, k, -1).sum(dim=1)


def local_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor, act: Activation, first: int) -> torch.Tensor:
    """Expert parallel: only the pairs routed to this rank's experts first .. first + len(up) - 1 (up/down
    hold those only); each token's row sums its pairs here, the other ranks' rows hold the rest."""
    local = experts - first
    tokens, slots = ((local >= 0) & (local < up.shape[0])).nonzero(as_tuple=True)
    rows = _expert_rows(x, tokens, local[tokens, slots], weights[tokens, slots], up, down, act)
    return torch.zeros_like(x).index_add_(0, tokens, rows)


class StackedWeight(nn.Module):
    """One [E, out, in] tensor for all experts, held as `.weight` so native keys read `experts.up.weight`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class Experts(nn.Module):
    """All experts, or (expert parallel) `count` of them."""

    def __init__(self, args: ModelArgs, count: int | None = None):
        super().__init__()
        ffn, count = args.moe_intermediate_size, count or args.num_experts
        self.up = StackedWeight(count, 2 * ffn, args.hidden_size)    # expert e: [gate_e; up_e]
        self.down = StackedWeight(count, args.hidden_size, ffn)


class MoE(nn.Module):
    """Router + experts (+ shared expert). `shared` is a dense GLU MLP the caller builds, so this module
    need not know the dense MLP's class; `kernel` picks the expert computation."""

    def __init__(self, args: ModelArgs, act: Activation, shared: nn.Module | None = None):
        super().__init__()
        self.act = act
        self.router = Router(args)
        self.experts = Experts(args)
        self.shared = shared
        self.shared_gate = nn.Linear(args.hidden_size, 1, bias=False) if args.shared_expert_gate else None
        self.kernel = grouped_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat)
        out = self.kernel(flat, weights, experts, self.experts.up.weight, self.experts.down.weight, self.act)
        if self.shared is not None:
            out = out + self.shared_output(flat)
        return out.view_as(x)

    def shared_output(self, flat: torch.Tensor) -> torch.Tensor:
        shared = self.shared(flat)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(flat)) * shared
        return shared
