"""OpenAI response bodies for completions and chat, whole and as server-sent-event chunks."""

from __future__ import annotations

import json
from typing import Any

from rosetool.serve.generation import Choice, Generation

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _head(gen: Generation, model: str, kind: str) -> dict[str, Any]:
    return {"id": gen.request_id, "object": kind, "created": gen.created, "model": model}


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float]) -> dict:
    return {"tokens": [_token_text(tokenizer, t) for t in token_ids], "token_logprobs": logprobs,
            "top_logprobs": None, "text_offset": None}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float]) -> dict:
    content = []
    for t, lp in zip(token_ids, logprobs):
        text = _token_text(tokenizer, t)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content}


def _last(choice: Choice, new_tokens: int) -> tuple[list[int], list[float]]:
    """The tokens (and their logprobs) a streamed chunk adds."""
    return choice.token_ids[len(choice.token_ids) - new_tokens:], choice.logprobs[len(choice.logprobs) - new_tokens:]


class Completions:
    """`/v1/completions` shapes; `logprobs` says whether each choice carries them."""

    def __init__(self, gen: Generation, model: str, tokenizer: Any, logprobs: bool):
        self.gen, self.model, self.tokenizer, self.logprobs = gen, model, tokenizer, logprobs

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        return completion_logprobs(self.tokenizer, token_ids, logprobs) if self.logprobs else None

    def whole(self) -> dict[str, Any]:
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": self._logprobs(c.token_ids, c.logprobs)} for c in self.gen.choices]
        return {**_head(self.gen, self.model, "text_completion"), "choices": choices, "usage": self.gen.usage()}

    def first_chunks(self) -> list[str]:
        return []

    def chunk(self, choice: Choice, delta: str, new_tokens: int) -> str:
        body = {"index": choice.index, "text": delta, "finish_reason": choice.finish_reason,
                "logprobs": self._logprobs(*_last(choice, new_tokens))}
        return sse({**_head(self.gen, self.model, "text_completion"), "choices": [body]})

    def usage_chunk(self) -> str:
        return sse({**_head(self.gen, self.model, "text_completion"), "choices": [], "usage": self.gen.usage()})


class ChatCompletions(Completions):
    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        return chat_logprobs(self.tokenizer, token_ids, logprobs) if self.logprobs else None

    def whole(self) -> dict[str, Any]:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(c.token_ids, c.logprobs), "finish_reason": c.finish_reason}
                   for c in self.gen.choices]
        return {**_head(self.gen, self.model, "chat.completion"), "choices": choices, "usage": self.gen.usage()}

    def first_chunks(self) -> list[str]:
        """The role comes first, alone, as OpenAI streams it."""
        return [sse({**_head(self.gen, self.model, "chat.completion.chunk"),
                     "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]})
                for c in self.gen.choices]

    def chunk(self, choice: Choice, delta: str, new_tokens: int) -> str:
        body = {"index": choice.index, "delta": {"content": delta}, "finish_reason": choice.finish_reason,
                "logprobs": self._chat_logprobs(*_last(choice, new_tokens))}
        return sse({**_head(self.gen, self.model, "chat.completion.chunk"), "choices": [body]})

    def usage_chunk(self) -> str:
        return sse({**_head(self.gen, self.model, "chat.completion.chunk"), "choices": [], "usage": self.gen.usage()})
