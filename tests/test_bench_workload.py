"""Workloads and arrival schedules: exact lengths, seeding, file formats and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rosetool.bench.workload import Vocab, WorkloadSpec, arrival_offsets, build
from rosetool.errors import RosetoolError


class WordTokenizer:
    """One token per whitespace word: enough to check that text prompts are counted by a tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [hash(w) % 100 for w in text.split()]


VOCAB = Vocab(size=50, special_ids={0, 1}, tokenizer=WordTokenizer())


def test_random_lengths_are_exact_and_within_range():
    spec = WorkloadSpec(kind="random", num_prompts=200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    requests = build(spec, VOCAB)
    assert len(requests) == 200
    assert all(len(r.prompt) == r.prompt_len for r in requests)
    assert {r.prompt_len for r in requests} <= set(range(10, 31))
    assert {r.output_len for r in requests} <= set(range(5, 16))
    assert len({r.prompt_len for r in requests}) > 5
    ids = np.concatenate([r.prompt for r in requests])
    assert ids.min() >= 2 and ids.max() < 50  # special ids 0, 1 never drawn


def test_random_without_range_is_fixed_and_seeded():
    spec = WorkloadSpec(kind="random", num_prompts=4, input_len=7, output_len=3, seed=1)
    a, b = build(spec, VOCAB), build(spec, VOCAB)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(r.prompt_len == 7 and r.output_len == 3 for r in a)
    other = build(WorkloadSpec(kind="random", num_prompts=4, input_len=7, output_len=3, seed=2), VOCAB)
    assert [r.prompt for r in other] != [r.prompt for r in a]


def test_fixed_prompt_repeated_and_counted_by_tokenizer():
    requests = build(WorkloadSpec(kind="fixed", num_prompts=3, prompt="a b c d", output_len=5), VOCAB)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in requests] == [("a b c d", 4, 5)] * 3


def test_text_workload_without_tokenizer_is_an_error():
    with pytest.raises(RosetoolError, match="no tokenizer"):
        build(WorkloadSpec(kind="fixed"), Vocab(size=10))


def test_shared_prefix_workload(tmp_path):
    spec = WorkloadSpec(kind="prefix", num_prompts=6, input_len=4, output_len=2, prefix_len=8, num_prefixes=2)
    requests = build(spec, VOCAB)
    assert all(r.prompt_len == 12 == len(r.prompt) for r in requests)
    prefixes = [tuple(r.prompt[:8]) for r in requests]
    assert prefixes[0] == prefixes[2] == prefixes[4] and prefixes[1] == prefixes[3] == prefixes[5]
    assert prefixes[0] != prefixes[1]


def test_jsonl_text_ids_and_output_len(tmp_path):
    path = tmp_path / "w.jsonl"
    rows = [{"prompt": "x y z", "output_len": 4}, {"prompt": [5, 6], "max_tokens": 2}, {"prompt": "q"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    requests = build(WorkloadSpec(kind="jsonl", path=path, num_prompts=10, output_len=9), VOCAB)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(3, 4), (2, 2), (1, 9)]
    assert requests[1].prompt == [5, 6]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(RosetoolError, match="bad.jsonl:2"):
        build(WorkloadSpec(kind="jsonl", path=path), VOCAB)


def test_sharegpt_uses_first_turns_and_filters_short(tmp_path):
    long_q, long_a = "w " * 6, "v " * 5
    data = [
        {"conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": long_a}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_a}]},
        {"conversations": [{"from": "human", "value": long_q}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    requests = build(WorkloadSpec(kind="sharegpt", path=path, num_prompts=5), VOCAB)
    assert [(r.prompt_len, r.output_len) for r in requests] == [(6, 5)]


def test_missing_dataset_and_bad_values():
    with pytest.raises(RosetoolError, match="--dataset-path"):
        build(WorkloadSpec(kind="jsonl"), VOCAB)
    with pytest.raises(RosetoolError, match="--workload"):
        build(WorkloadSpec(kind="csv"), VOCAB)
    with pytest.raises(RosetoolError, match="--range-ratio"):
        build(WorkloadSpec(range_ratio=1.5), VOCAB)


def test_arrivals_all_at_once_for_infinite_rate():
    assert arrival_offsets(4, float("inf"), 1.0, 0) == [0.0] * 4


def test_arrivals_are_seeded_with_mean_gap_one_over_rate():
    a = arrival_offsets(4000, 20.0, 1.0, seed=7)
    assert a == arrival_offsets(4000, 20.0, 1.0, seed=7)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.1)
    assert gaps.std() == pytest.approx(1 / 20, rel=0.1)  # exponential: std == mean


def test_burstiness_changes_spread_not_mean():
    bursty = np.diff(arrival_offsets(4000, 20.0, 0.25, seed=1))
    smooth = np.diff(arrival_offsets(4000, 20.0, 4.0, seed=1))
    assert bursty.mean() == pytest.approx(smooth.mean(), rel=0.15)
    # gamma CV = 1/sqrt(shape): 2.0 for 0.25, 0.5 for 4.0
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)
    assert smooth.std() / smooth.mean() == pytest.approx(0.5, rel=0.15)


def test_bad_rate():
    with pytest.raises(RosetoolError, match="--request-rate"):
        arrival_offsets(3, 0.0, 1.0, 0)
