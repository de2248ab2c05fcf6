"""OpenAI request bodies as pydantic models, and how their fields become `SamplingParams`.

Field names and defaults follow the OpenAI API (so the official client works unchanged); the extra
fields vLLM accepts (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`) are accepted the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rosetool.errors import RosetoolError
from rosetool.runtime.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields completions and chat share; unknown fields are ignored, as OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        if not 1 <= self.n <= 128:
            raise RosetoolError(f"n must be in [1, 128], got {self.n}")

    def sampling_params(self, max_tokens: int, logprobs: bool, choice: int) -> SamplingParams:
        """Params for choice `choice` of `n`: with a seed, each choice gets its own (seed + choice)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, -1),
            min_p=_or(self.min_p, 0.0), repetition_penalty=_or(self.repetition_penalty, 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=None if self.seed is None else self.seed + choice, max_tokens=max_tokens,
            stop_token_ids=list(self.stop_token_ids or []), stop=stop, ignore_eos=self.ignore_eos,
            logprobs=logprobs)


def _or(value: Any, default: Any) -> Any:
    """OpenAI clients send `null` for "not set"; it means the default, not zero."""
    return default if value is None else value


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]
        if not p:
            raise RosetoolError("prompt must not be empty")
        return list(p)

    def check(self) -> None:
        super().check()
        if self.echo or self.suffix:
            raise RosetoolError("echo and suffix are not supported")
        if self.logprobs not in (None, 0):
            raise RosetoolError("logprobs: only 0 is supported (the engine returns the sampled token's "
                                "logprob, not top alternatives)")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        super().check()
        if self.top_logprobs:
            raise RosetoolError("top_logprobs: only 0 is supported (the engine returns the sampled token's "
                                "logprob, not top alternatives)")


ErrorType = Literal["invalid_request_error", "not_found_error", "server_error", "service_unavailable"]


def error_body(message: str, kind: ErrorType, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
