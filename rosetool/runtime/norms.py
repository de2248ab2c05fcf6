"""The norms families use: LayerNorm, RMSNorm, and Gemma's RMSNorm that scales by (1 + weight).

Gemma stores its norm weights as offsets from one and multiplies in fp32 before casting back; keeping it a
norm kind of its own (not a converted weight) lets HF -> native -> HF stay bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonical import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma: x / rms(x) * (1 + weight), all in fp32, one cast at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    dim = dim or args.hidden_size
    if args.norm == "rmsnorm":
        return RMSNorm(dim, args.norm_eps)
    if args.norm == "gemma_rmsnorm":
        return OffsetRMSNorm(dim, args.norm_eps)
    return nn.LayerNorm(dim, eps=args.norm_eps, bias=args.norm_bias)
