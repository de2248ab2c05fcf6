"""One HTTP request in flight: its choices (prompts x n) submitted to the engine, their events
gathered, metrics observed, and every unfinished choice aborted when the caller stops listening.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from rosetool.runtime import SamplingParams
from rosetool.serve.engine_loop import EngineLoop, Event, Prompt
from rosetool.serve.metrics import ServerMetrics

POLL_S = 0.5


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_at: float | None = None


class Generation:
    def __init__(self, engine: EngineLoop, metrics: ServerMetrics, request_id: str):
        self.engine, self.metrics, self.request_id = engine, metrics, request_id
        self.started = time.perf_counter()
        self.created = int(time.time())
        self.sink: asyncio.Queue[Event] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self._check_at = 0.0   # when `_next` next asks whether the client is still there

    def _engine_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    async def start(self, prompts: list[Prompt], n: int,
                    params: Callable[[int], SamplingParams]) -> None:
        """Submit each prompt n times (choice index = prompt * n + j); `params(j)` builds choice j's params.

        Choices are submitted one by one so a bad prompt fails before the response starts; the ones
        already accepted are then aborted.
        """
        try:
            for p, text in enumerate(prompts):
                prompt = await self.engine.tokenize(text)   # once per prompt, however many choices
                for j in range(n):
                    index = p * n + j
                    length = await self.engine.add(self._engine_id(index), index, prompt, params(j), self.sink)
                    self.choices.append(Choice(index))
                    if j == 0:   # a prompt shared by n choices is counted once, as OpenAI does
                        self.prompt_tokens += length
        except BaseException:   # the refused (or cancelled) choice never ran; abort those that did
            self.abort()
            raise
        self.metrics.prompt_tokens += self.prompt_tokens

    def abort(self) -> None:
        """Abort every unfinished choice (the client left, or a sibling choice failed)."""
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.metrics.finished["abort"] += 1
                self.engine.abort(self._engine_id(choice.index))

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[tuple[Choice, str, int]]:
        """(choice, text delta, new tokens) per engine step until every choice finished; aborts what is left on exit.

        `is_disconnected` is polled while waiting (non-streaming answers, where nothing else notices a
        closed connection); a stream learns of it from the server cancelling its generator.
        """
        pending = len(self.choices)
        try:
            while pending:
                event = await self._next(is_disconnected)
                if event.error is not None:
                    raise event.error
                out, choice = event.output, self.choices[event.index]
                self._observe(choice, len(out.new_token_ids))
                choice.token_ids += out.new_token_ids
                if out.logprob is not None:
                    choice.logprobs.append(out.logprob)
                delta = out.text_delta or ""
                choice.text += delta
                if out.finished:
                    choice.finish_reason = out.finish_reason
                    pending -= 1
                    self.metrics.finished[out.finish_reason] += 1
                    self.metrics.e2e.observe(time.perf_counter() - self.started)
                yield choice, delta, len(out.new_token_ids)
        finally:
            self.abort()

    async def _next(self, is_disconnected: Callable[[], Awaitable[bool]] | None) -> Event:
        """The next event; with `is_disconnected`, the connection is checked every POLL_S whether
        events keep coming (a busy request) or not (a queued one)."""
        if is_disconnected is None:
            return await self.sink.get()
        while True:
            if time.perf_counter() >= self._check_at:
                if await is_disconnected():
                    raise ClientGone()
                self._check_at = time.perf_counter() + POLL_S
            try:
                return await asyncio.wait_for(self.sink.get(), POLL_S)
            except asyncio.TimeoutError:
                pass

    def _observe(self, choice: Choice, new_tokens: int) -> None:
        now = time.perf_counter()
        if choice.last_token_at is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.tpot.observe(now - choice.last_token_at)
        choice.last_token_at = now
        self.metrics.generation_tokens += new_tokens
