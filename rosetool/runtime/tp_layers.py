"""The three modules tensor parallelism changes, swapped into a rank-local `Transformer`.

Built from a rank-local `ModelArgs` (tp_shard.local_args) the model's own modules already compute
local shapes: column-parallel QKV and gate/up need nothing more. What needs communication is where a
rank holds part of a sum (the row-parallel attention output and MLP down projection) and where it
holds part of the vocabulary (embedding lookup). The LM head stays a local matmul: its logits are
this rank's vocabulary slice, gathered once per step by the runner. Parameter names are unchanged,
so the sharded state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .model import Transformer


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


def parallelize(model: Transformer, rank: int, group: dist.ProcessGroup) -> Transformer:
    """Swap in the communicating modules (call on the meta-device model, before loading weights)."""
    a = model.args
    model.embed = VocabParallelEmbedding(a.vocab_size, a.hidden_size, rank * a.vocab_size, group)
    for layer in model.layers:
        o, down = layer.attn.o, layer.mlp.down
        layer.attn.o = RowParallelLinear(o.in_features, o.out_features, o.bias is not None, group)
        layer.mlp.down = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, group)
    return model
