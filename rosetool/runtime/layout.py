"""Which part of a model each of the ranks holds, when attention is tensor-parallel and experts are expert-parallel.

The layout is vLLM's for one data-parallel replica (`--tensor-parallel-size N --enable-expert-parallel`):
one set of `world` processes, no sub-groups. Attention, dense MLPs, shared experts, embedding and LM head
are tensor-parallel over all of them (`tp` = world) or, with `tp` 1, replicated on every rank (vLLM would
make attention data-parallel there; one scheduler on rank 0 has no batches to split, so every rank attends
over every token and keeps the whole KV cache). Routed experts sit in `ep` groups of `world // ep` ranks:
expert k in group k * ep // E, each expert's ffn cut over its group's ranks as Megatron's expert tensor
parallel does (`--tp N` alone: every rank holds a 1/N slice of every expert).

`world` is max(tp, ep); attention tensor-parallel over only some of the expert ranks (1 < tp < ep) would
need sub-groups and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RosetoolError


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name, size in (("tensor_parallel_size", self.tp), ("expert_parallel_size", self.ep)):
            if size < 1:
                raise RosetoolError(f"LLM: {name} must be >= 1, got {size}")
        if self.world % self.ep:
            raise RosetoolError(f"expert_parallel_size={self.ep} does not divide the {self.world} ranks of "
                                f"tensor_parallel_size={self.tp}")
        if self.tp not in (1, self.world):
            raise RosetoolError(f"tensor_parallel_size={self.tp} with expert_parallel_size={self.ep}: attention "
                                f"tensor-parallel over {self.tp} of {self.world} ranks is not supported; use "
                                f"tensor_parallel_size=1 (attention replicated) or {self.world}")

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def etp(self) -> int:
        """Ranks sharing each expert (expert tensor parallel): world // ep."""
        return self.world // self.ep

    def expert_group(self, rank: int) -> int:
        return rank // self.etp

    def etp_rank(self, rank: int) -> int:
        return rank % self.etp

    def experts(self, rank: int, num_experts: int) -> range:
        """The experts rank `rank` holds (whole or sliced): k with k * ep // E == its group, contiguous,
        E / ep of them, or one fewer or more when ep does not divide E."""
        g = self.expert_group(rank)
        return range(-(-g * num_experts // self.ep), -(-(g + 1) * num_experts // self.ep))

    def describe(self) -> str:
        return f"tensor_parallel_size={self.tp}, expert_parallel_size={self.ep}"
