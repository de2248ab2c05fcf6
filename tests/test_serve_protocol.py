"""Request bodies -> SamplingParams, and the Prometheus histogram arithmetic, without a server."""

from __future__ import annotations

import pytest

from rosetool.errors import RosetoolError
from rosetool.serve.metrics import Histogram
from rosetool.serve.protocol import ChatCompletionRequest, CompletionRequest


def test_openai_fields_map_onto_sampling_params():
    body = CompletionRequest(model="m", prompt="x", temperature=0.3, top_p=0.8, top_k=5, min_p=0.1, stop="##",
                             seed=4, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                             ignore_eos=True, stop_token_ids=[7], n=2)
    p = body.sampling_params(max_tokens=9, logprobs=True, choice=1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.3, 0.8, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.stop == ["##"] and p.stop_token_ids == [7] and p.ignore_eos and p.logprobs
    assert p.seed == 5 and p.max_tokens == 9   # choice 1 of a seeded request: its own stream


def test_nulls_mean_openai_defaults():
    p = ChatCompletionRequest(model="m", messages=[], temperature=None, top_p=None, stop=None).sampling_params(
        max_tokens=3, logprobs=False, choice=0)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.logprobs) == (1.0, 1.0, -1, None, [], False)


def test_prompt_shapes():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(RosetoolError, match="must not be empty"):
        CompletionRequest(model="m", prompt=[]).prompts()


@pytest.mark.parametrize("body, message", [
    (CompletionRequest(model="m", prompt="a", n=0), "n must"),
    (CompletionRequest(model="m", prompt="a", logprobs=2), "logprobs"),
    (CompletionRequest(model="m", prompt="a", suffix="z"), "suffix"),
    (ChatCompletionRequest(model="m", messages=[], top_logprobs=3), "top_logprobs"),
])
def test_unsupported_fields_are_refused(body, message):
    with pytest.raises(RosetoolError, match=message):
        body.check()


def test_histogram_is_cumulative_with_inf():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 3.65", "x_count 4"]
