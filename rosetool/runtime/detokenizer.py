"""Incremental detokenization with stop strings.

Decoding a window of recent tokens (prefix offset / read offset, as in TGI and vLLM) keeps each step
O(1) and never emits half of a multi-byte character. Text that could still become a stop string is
held back from the stream, so what was streamed always equals the final, cut text.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = list(prompt_ids)
        # Starting a few prompt tokens back lets tokenizers that strip leading spaces decode right.
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> bool:
        """Append a token; return True when the text now contains a stop string (already cut)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return self._cut_at_stop(len(delta))

    def take_delta(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.emitted: end]
        self.emitted = max(self.emitted, end)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _cut_at_stop(self, delta_len: int) -> bool:
        hits = []
        for stop in self.stop:
            index = self.text.find(stop, max(0, len(self.text) - delta_len - len(stop) + 1))
            if index != -1:
                hits.append(index)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best
