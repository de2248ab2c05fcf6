"""Benchmark arithmetic on hand-made timestamps, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rosetool.bench.metrics import (RequestResult, aggregate, latency_metrics, meets_slo, parse_percentiles,
                                    parse_slo, percentile_label, serving_metrics, throughput)
from rosetool.errors import RosetoolError


def req(start: float, stamps: list[float], prompt_len: int = 10, tokens: int | None = None) -> RequestResult:
    return RequestResult(prompt_len=prompt_len, start=start, end=stamps[-1], token_times=stamps,
                         output_tokens=len(stamps) if tokens is None else tokens)


def test_per_request_ttft_tpot_itl_e2el():
    r = req(1.0, [1.2, 1.3, 1.5, 1.6])
    assert r.ttft == pytest.approx(0.2)
    assert r.e2el == pytest.approx(0.6)
    assert r.tpot == pytest.approx((0.6 - 0.2) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.1])


def test_single_token_has_no_tpot_and_passes_tpot_slo():
    r = req(0.0, [0.05])
    assert r.tpot is None
    assert meets_slo(r, {"tpot": 1.0, "ttft": 100.0})
    assert not meets_slo(r, {"ttft": 10.0})


def test_tpot_uses_reported_token_count_not_chunk_count():
    # one streamed chunk carrying 5 tokens, as some servers batch them
    r = req(0.0, [0.1, 0.5], tokens=5)
    assert r.tpot == pytest.approx((0.5 - 0.1) / 4)


def test_serving_metrics_on_synthetic_run():
    results = [req(0.0, [0.1, 0.2, 0.3]), req(0.5, [0.8, 1.0, 1.2]), req(1.0, [1.1, 1.4])]
    m = serving_metrics(results, duration_s=2.0, percentiles=[50, 90, 99.9])
    assert m["completed"] == 3 and m["failed"] == 0
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(19.0)
    # ttfts 100, 300, 100 ms
    assert m["mean_ttft_ms"] == pytest.approx(500 / 3)
    assert m["median_ttft_ms"] == pytest.approx(100)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(((100 - 500 / 3) ** 2 * 2 + (300 - 500 / 3) ** 2) / 3))
    # percentiles interpolate linearly (numpy default, as vLLM): p90 of [100,100,300] = 100 + 0.8*200
    assert m["p90_ttft_ms"] == pytest.approx(260)
    assert m["p99.9_ttft_ms"] == pytest.approx(100 + 0.998 * 200)
    # tpots 100, 200, 300 ms; itls pooled: 100,100,200,200,300 ms
    assert m["mean_tpot_ms"] == pytest.approx(200)
    assert m["mean_itl_ms"] == pytest.approx(180)
    assert m["median_itl_ms"] == pytest.approx(200)
    assert m["p50_e2el_ms"] == pytest.approx(400)
    assert "request_goodput" not in m


def test_goodput_counts_only_requests_meeting_every_slo():
    results = [req(0.0, [0.1, 0.2, 0.3]), req(0.5, [0.8, 1.0, 1.2]), req(1.0, [1.1, 1.4])]
    slo = parse_slo("ttft:150,e2el:700")
    m = serving_metrics(results, 2.0, [50], slo)
    # request 1: ttft 100, e2el 300 ok; request 2: ttft 300 fails; request 3: ttft 100, e2el 400 ok
    assert m["request_goodput"] == pytest.approx(1.0)
    assert serving_metrics(results, 2.0, [50], {"tpot": 250})["request_goodput"] == pytest.approx(1.0)


def test_failed_requests_are_counted_not_averaged():
    bad = RequestResult(prompt_len=99, start=0.0, end=0.01, success=False, error="HTTP 500")
    m = serving_metrics([req(0.0, [0.1, 0.2]), bad], 1.0, [50])
    assert m["completed"] == 1 and m["failed"] == 1
    assert m["total_input_tokens"] == 10
    assert m["mean_ttft_ms"] == pytest.approx(100)
    assert not meets_slo(bad, {"ttft": 1e9})


def test_empty_distribution_reports_zero():
    m = serving_metrics([req(0.0, [0.1])], 1.0, [99])
    assert m["mean_tpot_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_throughput_zero_duration_is_nan_not_crash():
    assert math.isnan(throughput([req(0.0, [0.0])], 0.0)["request_throughput"])


def test_latency_metrics_use_slowest_row_per_step():
    results = [req(10.0, [10.2, 10.3, 10.4]), req(10.0, [10.25, 10.32, 10.45])]
    m = latency_metrics(results, start=10.0)
    assert m["prefill_ms"] == pytest.approx(250)
    assert m["decode_step_ms"] == pytest.approx((450 - 250) / 2)
    assert m["latency_ms"] == pytest.approx(450)
    assert m["decode_steps"] == 2


def test_latency_metrics_without_tokens_is_an_error():
    with pytest.raises(RosetoolError, match="no tokens"):
        latency_metrics([RequestResult(prompt_len=1, start=0.0, end=1.0)], 0.0)


def test_aggregate_median_and_mean():
    runs = [{"x": 1.0}, {"x": 2.0}, {"x": 6.0}]
    assert aggregate(runs, ["x"]) == {"x": 2.0, "mean_x": 3.0}


def test_parsers_and_labels():
    assert parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    assert parse_slo("TTFT:200,tpot:50") == {"ttft": 200.0, "tpot": 50.0}
    assert parse_slo(None) == {}
    assert percentile_label(99.0) == "p99" and percentile_label(99.9) == "p99.9"


@pytest.mark.parametrize("text", ["fast", "50,101", ""])
def test_bad_percentiles(text):
    with pytest.raises(RosetoolError, match="--percentiles"):
        parse_percentiles(text)


@pytest.mark.parametrize("text", ["ttft", "latency:5", "ttft:-1", "tpot:abc"])
def test_bad_slo(text):
    with pytest.raises(RosetoolError, match="--slo"):
        parse_slo(text)
