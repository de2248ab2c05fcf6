"""The requests a benchmark sends, identical whichever backend receives them.

Token-id workloads (random, prefix) are sent as ids, never as text, so prompt lengths are exact
and no backend re-tokenises them differently; text workloads (fixed, jsonl, sharegpt) are counted
with the model's tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rosetool.errors import RosetoolError

KINDS = ("random", "fixed", "jsonl", "sharegpt", "prefix")
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class Vocab:
    """What a workload needs from the model: ids it may draw and a tokenizer to count text."""

    size: int
    special_ids: set[int] = field(default_factory=set)
    tokenizer: Any = None

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            raise RosetoolError("this workload is text but the model has no tokenizer; use --workload random")
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class WorkloadSpec:
    kind: str = "random"
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    prompt: str = DEFAULT_PROMPT
    path: Path | None = None
    prefix_len: int = 64
    num_prefixes: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise RosetoolError(f"--workload {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise RosetoolError("--num-prompts, --input-len and --output-len must each be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise RosetoolError(f"--range-ratio {self.range_ratio}: must be within [0, 1)")
        if self.kind == "prefix" and (self.prefix_len < 1 or self.num_prefixes < 1):
            raise RosetoolError("--prefix-len and --num-prefixes must each be at least 1")
        if self.kind in ("jsonl", "sharegpt") and (self.path is None or not self.path.is_file()):
            raise RosetoolError(f"--dataset-path {self.path}: file not found (needed by --workload {self.kind})")


def build(spec: WorkloadSpec, vocab: Vocab) -> list[Request]:
    """Seeded: the same spec and vocabulary always yields the same requests."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    builders = {"random": _random, "fixed": _fixed, "jsonl": _jsonl, "sharegpt": _sharegpt, "prefix": _prefix}
    requests = builders[spec.kind](spec, vocab, rng)
    if not requests:
        raise RosetoolError(f"--dataset-path {spec.path}: no usable requests in the file")
    return requests


def _lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def _draw_ids(vocab: Vocab, n: int, rng: np.random.Generator) -> list[int]:
    allowed = np.setdiff1d(np.arange(vocab.size), np.fromiter(vocab.special_ids, dtype=int))
    return [int(i) for i in rng.choice(allowed, size=n)]


def _random(spec: WorkloadSpec, vocab: Vocab, rng: np.random.Generator) -> list[Request]:
    ins = _lengths(spec.input_len, spec.range_ratio, spec.num_prompts, rng)
    outs = _lengths(spec.output_len, spec.range_ratio, spec.num_prompts, rng)
    return [Request(_draw_ids(vocab, n, rng), n, o) for n, o in zip(ins, outs)]


def _prefix(spec: WorkloadSpec, vocab: Vocab, rng: np.random.Generator) -> list[Request]:
    prefixes = [_draw_ids(vocab, spec.prefix_len, rng) for _ in range(spec.num_prefixes)]
    suffixes = _random(spec, vocab, rng)
    requests = []
    for i, sfx in enumerate(suffixes):
        ids = prefixes[i % spec.num_prefixes] + list(sfx.prompt)
        requests.append(Request(ids, len(ids), sfx.output_len))
    return requests


def _fixed(spec: WorkloadSpec, vocab: Vocab, rng: np.random.Generator) -> list[Request]:
    n = vocab.count(spec.prompt)
    return [Request(spec.prompt, n, spec.output_len) for _ in range(spec.num_prompts)]


def _jsonl(spec: WorkloadSpec, vocab: Vocab, rng: np.random.Generator) -> list[Request]:
    """One object a line: `prompt` (text or ids) and optional `output_len` or `max_tokens`."""
    requests = []
    for lineno, line in enumerate(spec.path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (ValueError, KeyError, TypeError):
            raise RosetoolError(f"{spec.path}:{lineno}: expected a JSON object with a 'prompt' field") from None
        n = len(prompt) if isinstance(prompt, list) else vocab.count(prompt)
        out = int(row.get("output_len", row.get("max_tokens", spec.output_len)))
        requests.append(Request(prompt, n, out))
        if len(requests) == spec.num_prompts:
            break
    return requests


def _sharegpt(spec: WorkloadSpec, vocab: Vocab, rng: np.random.Generator) -> list[Request]:
    """First human turn as prompt, the reply's token count as output length, filtered like vLLM."""
    try:
        data = json.loads(spec.path.read_text())
        convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    except (ValueError, TypeError, AttributeError):
        raise RosetoolError(f"{spec.path}: not a ShareGPT JSON list of {{'conversations': [...]}}") from None
    requests = []
    for idx in rng.permutation(len(convs)):
        prompt, reply = convs[idx][0]["value"], convs[idx][1]["value"]
        n, out = vocab.count(prompt), vocab.count(reply)
        if n < 4 or out < 4 or n > 1024 or n + out > 2048:
            continue
        requests.append(Request(prompt, n, out))
        if len(requests) == spec.num_prompts:
            break
    return requests


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after start at which each request is sent.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate whatever the
    burstiness, Poisson at 1.0, burstier below. The first request goes at 0; rate inf sends all.
    """
    if rate <= 0 or burstiness <= 0:
        raise RosetoolError("--request-rate and --burstiness must be greater than 0")
    if np.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    return [0.0] + [float(x) for x in np.cumsum(gaps[: n - 1])]
