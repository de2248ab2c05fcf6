"""Scheduler with real block manager and sequences; the model is replaced by appending a token."""

import pytest

from rosetool.runtime.block_manager import BlockManager
from rosetool.runtime.sampling_params import SamplingParams
from rosetool.runtime.scheduler import Scheduler
from rosetool.runtime.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_num_seqs=8, budget=64, caching=True):
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget)


def add(sched, rid, n_prompt, max_tokens=4):
    s = Sequence(rid, list(range(1, n_prompt + 1)), n_prompt, SamplingParams(max_tokens=max_tokens))
    sched.add(s)
    return s


def step(sched):
    """One engine step without a model: sequences that reach their last token get a new token."""
    batch = sched.schedule()
    sampled = [s for i, s in enumerate(batch.seqs) if batch.completes_prefill(i)]
    sched.advance(batch)
    for s in sampled:
        s.token_ids.append(7)
        if s.num_output_tokens >= s.params.max_tokens:
            sched.finish(s, "length")
    return batch


def run_all(sched, limit=500):
    for _ in range(limit):
        if not sched.has_unfinished():
            return
        assert step(sched).seqs, "no progress"
    pytest.fail("did not finish")


def test_prefill_then_decode_batches():
    sched = make()
    a, b = add(sched, "a", 5), add(sched, "b", 3)
    batch = step(sched)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [5, 3]
    batch = step(sched)
    assert batch.is_decode and batch.num_new_tokens == [1, 1]


def test_chunked_prefill_respects_budget():
    sched = make(budget=4)
    a = add(sched, "a", 10)
    sizes = []
    while a.num_output_tokens == 0:
        sizes.append(step(sched).num_tokens)
    assert sizes == [4, 4, 2]
    run_all(sched)
    assert a.output_token_ids == [7] * 4


def test_new_requests_join_between_decode_steps():
    sched = make()
    a = add(sched, "a", 3, max_tokens=10)
    step(sched)
    step(sched)
    b = add(sched, "b", 2)
    batch = step(sched)
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 2]


def test_max_num_seqs_caps_running():
    sched = make(max_num_seqs=2)
    for i in range(3):
        add(sched, str(i), 2)
    assert len(step(sched).seqs) == 2 and len(sched.waiting) == 1


def test_preemption_requeues_newest_and_everything_finishes():
    sched = make(num_blocks=6, block_size=4)
    seqs = [add(sched, str(i), 6, max_tokens=8) for i in range(3)]
    run_all(sched)
    assert sched.num_preemptions > 0
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == 8 for s in seqs)
    assert sched.block_manager.num_free_blocks == 6


def test_preempted_sequence_goes_to_front_of_waiting():
    sched = make(num_blocks=4, block_size=4)
    add(sched, "a", 7, max_tokens=20)
    b = add(sched, "b", 7, max_tokens=20)
    step(sched)
    c = add(sched, "c", 2)
    while sched.num_preemptions == 0:
        step(sched)
    assert sched.waiting[0] is b and b.block_table == [] and b.num_cached_tokens == 0
    assert list(sched.waiting) == [b, c]
