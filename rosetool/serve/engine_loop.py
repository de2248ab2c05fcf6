"""One background thread drives the runtime; HTTP handlers talk to it through queues.

The runtime's `LLM` is not thread-safe, so every call on it happens in the engine thread: handlers
post commands (add, abort, stop) and receive their tokens on an asyncio queue, delivered once per step
with `call_soon_threadsafe`. Prompts are tokenised before that, in a thread of their own (as vLLM's
API server does): a long prompt must not hold up the steps that produce every other client's tokens. This is vLLM's AsyncLLM shape
without the separate process: model steps release the GIL inside torch, so the event loop keeps
serving while the engine computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Union

from rosetool.errors import RosetoolError
from rosetool.runtime import LLM, SamplingParams
from rosetool.runtime.outputs import StepOutput

log = logging.getLogger("rosetool.serve")

# What a handler asks to generate from: text (tokenised like `rosetool generate`), token ids, or a
# function run in the engine thread that returns token ids (a chat rendering needs the tokenizer).
Prompt = Union[str, list[int], Callable[[], list[int]]]


@dataclass(slots=True)
class Event:
    """One choice's news: a step's output, or the error that ended it."""

    index: int
    output: StepOutput | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Add:
    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    sink: asyncio.Queue
    accepted: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(self, llm: LLM):
        self.llm = llm
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[int, asyncio.Queue]] = {}   # engine thread only
        self._thread = threading.Thread(target=self._run, name="rosetool-engine", daemon=True)
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosetool-tokenize")
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        """Finish whatever is in flight, then end the thread."""
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids for a prompt: text encoded and chat rendered in the tokenizer thread, off the engine's."""
        if isinstance(prompt, list):
            return prompt
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, self._ids, prompt)

    def _ids(self, prompt: str | Callable[[], list[int]]) -> list[int]:
        if callable(prompt):
            return prompt()
        if self.llm.tokenizer is None:
            raise RosetoolError("this model has no tokenizer; pass prompts as lists of token ids")
        return self.llm.tokenizer.encode(prompt)   # what `LLM.add_request` does with text

    async def add(self, request_id: str, index: int, prompt: list[int], params: SamplingParams,
                  sink: asyncio.Queue) -> int:
        """Queue a request whose events go to `sink`; return its prompt length once the engine took it.

        A bad prompt (too long, outside the vocabulary) raises `RosetoolError` here, before any
        response has started, so the handler can still answer 400.
        """
        accepted = asyncio.get_running_loop().create_future()
        self._commands.put(_Add(request_id, index, prompt, params, sink, accepted))
        try:
            return await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self.llm.has_unfinished()):
            idle = not self.llm.has_unfinished()
            try:
                command = self._commands.get(block=idle and not stopping)
                while True:
                    stopping |= command is None
                    if command is not None:
                        self._apply(command)
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            if self.llm.has_unfinished():
                self._step()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            if self._sinks.pop(command.request_id, None) is not None:
                self.llm.abort(command.request_id)
            return
        ids = command.prompt
        try:
            self.llm.add_request(ids, command.params, command.request_id)
        except Exception as exc:   # RosetoolError is the client's fault (400); anything else is ours
            self._resolve(command.accepted, exc)
            return
        self._sinks[command.request_id] = (command.index, command.sink)
        self._resolve(command.accepted, len(ids))

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except Exception as exc:   # never leave a client hanging: every live request gets the error
            log.exception("engine step failed")
            failed = [(sink, Event(index, error=exc)) for index, sink in self._sinks.values()]
            for request_id in list(self._sinks):
                self.llm.abort(request_id)
            self._sinks.clear()
            self._deliver(failed)
            return
        events = []
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:   # aborted by its client already
                continue
            if out.finished:
                del self._sinks[out.request_id]
            events.append((target[1], Event(target[0], output=out)))
        self._deliver(events)

    def _deliver(self, events: list[tuple[asyncio.Queue, Event]]) -> None:
        if events:
            self._loop.call_soon_threadsafe(_put_all, events)

    def _resolve(self, future: asyncio.Future, value: int | BaseException) -> None:
        self._loop.call_soon_threadsafe(_settle, future, value)


def _put_all(events: list[tuple[asyncio.Queue, Event]]) -> None:
    for sink, event in events:
        sink.put_nowait(event)


def _settle(future: asyncio.Future, value: int | BaseException) -> None:
    if future.done():   # the handler went away meanwhile
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
