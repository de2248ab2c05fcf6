"""Sampler: penalty arithmetic, filters that never leak excluded tokens, seeded repeatability."""

import math

import pytest
import torch

from rosetool.errors import RosetoolError
from rosetool.runtime.sampler import apply_penalties, sample
from rosetool.runtime.sampling_params import SamplingParams
from rosetool.runtime.sequence import Sequence


def seq(params, prompt=(0,), output=(), seed=None):
    s = Sequence("r", [*prompt, *output], len(prompt), params)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def test_penalties_arithmetic():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0, -1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    s = seq(params, prompt=[0, 1], output=[2, 2, 4])
    out = apply_penalties(logits, [s])
    # token 0: prompt only -> 2/2; token 1: prompt -> -2*2; token 2: output x2 -> 1/2 - 0.5*2 - 0.25;
    # token 3: unseen; token 4: output x1 -> -1*2 - 0.5 - 0.25
    expected = torch.tensor([[1.0, -4.0, 0.5 - 1.0 - 0.25, 3.0, -2.0 - 0.5 - 0.25]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, 3.0, -1.0]]))  # input untouched


def test_penalties_leave_other_rows_alone():
    logits = torch.randn(2, 6)
    s_plain = seq(SamplingParams(), output=[1])
    s_pen = seq(SamplingParams(presence_penalty=1.0), output=[1])
    out = apply_penalties(logits, [s_plain, s_pen])
    assert torch.equal(out[0], logits[0]) and out[1, 1] == logits[1, 1] - 1


def test_greedy_picks_argmax_and_reports_raw_logprob():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    seqs = [seq(SamplingParams(temperature=0, logprobs=True)), seq(SamplingParams(temperature=0))]
    tokens, logprobs = sample(logits, seqs)
    assert tokens == [1, 0]
    assert math.isclose(logprobs[0], logits[0].log_softmax(-1)[1].item(), rel_tol=1e-6)
    assert logprobs[1] is None


def draws(params, logits, n=400, seed=None):
    seqs = [seq(params, seed=None if seed is None else seed + i) for i in range(n)]
    tokens, _ = sample(logits.expand(n, -1), seqs)
    return tokens


def test_top_k_top_p_min_p_never_pick_excluded_tokens():
    logits = torch.tensor([[3.0, 2.9, 2.0, 1.0, 0.5, -1.0, 0.0, 2.5]])
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    assert set(draws(SamplingParams(top_k=3), logits)) <= set(order[:3])
    # nucleus: smallest prefix of the sorted distribution whose mass reaches 0.7
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.7).sum()) + 1])
    picked = draws(SamplingParams(top_p=0.7), logits)
    assert set(picked) <= nucleus and len(set(picked)) > 1
    allowed = {i for i in range(8) if probs[i] >= 0.3 * probs.max()}
    assert set(draws(SamplingParams(min_p=0.3), logits)) <= allowed
    assert set(draws(SamplingParams(top_k=4, top_p=0.5), logits)) <= set(order[:4])


def test_seeded_sampling_repeats_and_ignores_batch_neighbours():
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.3, seed=11)
    alone = [sample(logits, [seq(params, seed=11)])[0][0] for _ in range(3)]
    g = seq(params, seed=11)
    run = [sample(logits, [g])[0][0] for _ in range(20)]
    g2 = seq(params, seed=11)
    other = seq(SamplingParams(temperature=1.0))
    mixed = [sample(logits.expand(2, -1), [other, g2])[0][1] for _ in range(20)]
    assert len(set(alone)) == 1 and run == mixed and len(set(run)) > 1


def test_temperature_draws_follow_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    picked = draws(SamplingParams(temperature=1.0), logits, n=4000, seed=0)
    assert abs(sum(picked) / len(picked) - 0.75) < 0.03


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0),
                                 dict(max_tokens=0), dict(min_p=2), dict(stop=[""])])
def test_bad_params_raise(bad):
    with pytest.raises(RosetoolError):
        SamplingParams(**bad)
