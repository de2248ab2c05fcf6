"""What the engine hands back: whole generations and per-step streaming events."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[float] | None


@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text_delta: str | None
    logprob: float | None = None  # of the new token, when the request asked for logprobs
