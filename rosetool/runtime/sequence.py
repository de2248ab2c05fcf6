"""One request's state as it moves through the scheduler, block manager and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from rosetool.runtime.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """`token_ids` holds prompt and output; `num_cached_tokens` of them have K/V in the paged cache.

    After a preemption the blocks are dropped and `num_cached_tokens` returns to 0, so the next
    schedule recomputes prompt and output tokens alike (only the last token is sampled from).
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_hashed_blocks: int = 0  # leading blocks already registered for prefix caching
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    generator: Any = None  # torch.Generator for seeded sampling, kept here so it survives preemption

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncached_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size: (index + 1) * block_size]
