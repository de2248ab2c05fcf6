"""Per-request decoding knobs, validated up front so a bad value fails at `add_request`, not mid-batch."""

from __future__ import annotations

import math
from numbers import Integral, Real
from dataclasses import dataclass, field

from rosetool.errors import RosetoolError

SEED_MAX = 2**64 - 1    # torch.Generator.manual_seed's range
INT_MAX = 2**63 - 1     # what a torch.long holds: counts and ids beyond it are nobody's real value


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        numbers = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                   "frequency_penalty": self.frequency_penalty}
        for name, value in numbers.items():   # NaN fails every range test below; inf passes some
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise RosetoolError(f"SamplingParams: {name} must be a finite number, got {value}")
        counts = [("top_k", self.top_k), ("max_tokens", self.max_tokens)] + \
            [("stop_token_ids", t) for t in self.stop_token_ids]
        for name, value in counts:
            if isinstance(value, bool) or not isinstance(value, Integral) or abs(value) > INT_MAX:
                raise RosetoolError(f"SamplingParams: {name} must be an integer of at most {INT_MAX}, got {value}")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.seed is None or (isinstance(self.seed, Integral) and 0 <= self.seed <= SEED_MAX),
             f"seed must be an integer in [0, {SEED_MAX}], got {self.seed}"),
            (all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be non-negative, got {self.stop_token_ids}"),
            (all(self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise RosetoolError(f"SamplingParams: {message}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
