"""The modules tensor and expert parallelism change, swapped into a rank-local `Transformer`.

Built from a rank-local `ModelArgs` (tp_shard.local_args) the model's own modules already compute
local shapes: column-parallel QKV and gate/up need nothing more. What needs communication is where a
rank holds part of a sum (the row-parallel attention output and MLP down projection) and where it
holds part of the vocabulary (embedding lookup). The LM head stays a local matmul: its logits are
this rank's vocabulary slice, gathered once per step by the runner. An MoE layer becomes `ParallelMoE`.
Parameter names are unchanged, so the sharded state dict loads as is.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import RosetoolError
from .layout import ParallelLayout
from .model import Transformer
from .moe import Experts, MoE, local_experts


class RowParallelLinear(nn.Linear):
    """Partial products summed across ranks; the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + local vocab) of the table; other ids look up zeros, then ranks sum."""

    def __init__(self, num_embeddings: int, dim: int, start: int, group: dist.ProcessGroup):
        super().__init__(num_embeddings, dim)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class ParallelMoE(MoE):
    """An MoE layer whose experts are spread over the ranks; every rank ends with the whole layer's output.

    Dispatch and combine are one all-reduce of partial outputs. Every rank already holds every token's
    hidden state (attention ends in an all-reduce, or is replicated), and the router is replicated, so all
    ranks choose the same experts and dispatch moves no data: each runs the (token, expert) pairs of the
    experts it holds (whole ones under expert parallel, its ffn slice of each under expert tensor
    parallel), scales them by their routing weights (each pair lives on one rank: weighted once), and the
    sum over ranks of these [tokens, hidden] partials is the layer's output. That sum is an all-gather +
    reduce-scatter's second half plus the all-gather the next attention needs, i.e. an all-reduce, of the
    same size as a dense row-parallel MLP's; vLLM's FusedMoE does the same when its data-parallel size is 1.
    An all-to-all would send each token only to its k experts' ranks, but it pays off only once attention is
    data-parallel (each rank with its own tokens), which a single scheduler on rank 0 does not have.
    The shared expert joins the same all-reduce: sliced over the ranks like a dense MLP (tp > 1), or, whole
    on every rank (tp 1), added by rank 0 only.
    """

    def __init__(self, moe: MoE, rank: int, layout: ParallelLayout, group: dist.ProcessGroup):
        args = moe.router.args
        super().__init__(args, moe.act, moe.shared)
        experts = layout.experts(rank, args.num_experts)
        self.experts = Experts(args, len(experts))
        if len(experts) < args.num_experts:
            self.kernel = partial(local_experts, first=experts.start)
        self.shared_here = layout.tp > 1 or rank == 0
        if moe.shared is not None and moe.shared.down.bias is not None:
            raise RosetoolError("a shared expert with a down-projection bias cannot be split over ranks")
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat)
        out = self.kernel(flat, weights, experts, self.experts.up.weight, self.experts.down.weight, self.act)
        if self.shared is not None and self.shared_here:
            out = out + self.shared_output(flat)
        dist.all_reduce(out, group=self.group)
        return out.view_as(x)


def parallelize(model: Transformer, rank: int, layout: ParallelLayout, group: dist.ProcessGroup) -> Transformer:
    """Swap in the communicating modules (call on the meta-device model, before loading weights). With
    tensor_parallel_size 1 only the MoE layers change: everything else is replicated."""
    a = model.args
    if layout.tp > 1:
        model.embed = VocabParallelEmbedding(a.vocab_size, a.hidden_size, rank * a.vocab_size, group)
    for layer in model.layers:
        if layer.moe is not None:
            layer.moe = ParallelMoE(layer.moe, rank, layout, group)
        if layout.tp == 1:
            continue
        o = layer.attn.o
        layer.attn.o = RowParallelLinear(o.in_features, o.out_features, o.bias is not None, group)
        if layer.mlp is not None:
            down = layer.mlp.down
            layer.mlp.down = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, group)
    return model
