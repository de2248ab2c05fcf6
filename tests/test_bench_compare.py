"""Flattening and ratios of saved results, including multi-mode, sweep and vLLM-written files."""

from __future__ import annotations

import json

import pytest

from rosetool.bench import compare, report
from rosetool.errors import RosetoolError

VLLM = {"backend": "vllm", "request_throughput": 20.0, "mean_ttft_ms": 50.0, "ttfts": [0.05], "burstiness": 1.0}
OURS = {"mode": "online", "request_throughput": 10.0, "mean_ttft_ms": 100.0, "config": {"run": {"runs": 3}}}
ALL = {"mode": "all", "results": {"naive": {"request_throughput": 2.0}, "online": {"mean_ttft_ms": 7.0}}}
SWEEP = {"mode": "sweep", "sweep": {"parameter": "concurrency"},
         "points": [{"concurrency": 1, "request_throughput": 3.0}, {"concurrency": 8, "request_throughput": 9.0}]}


def test_flatten_prefixes_modes_and_sweep_points():
    assert compare.flatten(ALL) == {"naive.request_throughput": 2.0, "online.mean_ttft_ms": 7.0}
    flat = compare.flatten(SWEEP)
    assert flat["concurrency=1.request_throughput"] == 3.0 and flat["concurrency=8.request_throughput"] == 9.0
    assert "ttfts" not in compare.flatten(VLLM)  # arrays and nested config are not metrics


def test_rows_give_ratios_to_the_first_file_and_gaps_as_none():
    rows = {r["metric"]: r for r in compare.rows([OURS, VLLM, ALL], show_all=False)}
    assert rows["request_throughput"]["values"] == [10.0, 20.0, None]
    assert rows["request_throughput"]["ratios"] == [2.0, None]
    assert rows["mean_ttft_ms"]["ratios"][0] == pytest.approx(0.5)
    assert rows["naive.request_throughput"]["values"] == [None, None, 2.0]
    assert "burstiness" not in rows
    assert "burstiness" in {r["metric"] for r in compare.rows([OURS, VLLM], show_all=True)}


def test_nothing_in_common_is_an_error():
    with pytest.raises(RosetoolError, match="no metrics"):
        compare.rows([{"mode": "x", "foo": 1.0}], show_all=False)


def test_load_accepts_ours_and_vllm_files(tmp_path):
    for name, doc in (("ours", OURS), ("vllm", VLLM)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        assert report.load(tmp_path / f"{name}.json")["request_throughput"] == doc["request_throughput"]
    with pytest.raises(RosetoolError, match="cannot read result file"):
        report.load(tmp_path / "missing.json")


def test_save_writes_strict_json(tmp_path):
    doc = {"mode": "online", "request_rate": float("inf"), "path": tmp_path, "x": float("nan")}
    report.save(doc, tmp_path / "out" / "r.json")
    text = (tmp_path / "out" / "r.json").read_text()
    assert json.loads(text)["request_rate"] == "inf" and "NaN" not in text


def test_labels_disambiguate_equal_stems(tmp_path):
    a, b = tmp_path / "x" / "r.json", tmp_path / "y" / "r.json"
    assert compare.labels([tmp_path / "a.json", tmp_path / "b.json"]) == ["a", "b"]
    assert compare.labels([a, b]) == [str(a), str(b)]


def test_each_metric_says_which_direction_is_better():
    assert compare.better("request_throughput") == "higher" and compare.better("online.output_throughput") == "higher"
    assert compare.better("concurrency=8.mean_ttft_ms") == "lower" and compare.better("duration") == "lower"
    assert compare.better("failed") == "lower" and compare.better("request_goodput") == "higher"
    rows = {r["metric"]: r["better"] for r in compare.rows([OURS, VLLM], show_all=False)}
    assert rows == {"request_throughput": "higher", "mean_ttft_ms": "lower"}


def test_different_modes_or_workloads_are_flagged_incomparable():
    sized = {**OURS, "config": {"workload": {"num_prompts": 8, "input_len": 32, "output_len": 16}}}
    bigger = {**sized, "config": {"workload": {"num_prompts": 32, "input_len": 128, "output_len": 64}}}
    assert compare.incomparable(["a", "b"], [sized, sized]) == []
    [warning] = compare.incomparable(["a", "b", "c"], [sized, sized, bigger])
    assert warning.startswith("c measured online, 32 prompts") and "not comparable" in warning
    assert "sweep over concurrency" in compare.incomparable(["a", "b"], [OURS, SWEEP])[0]


def test_compare_cli_warns_and_plots(tmp_path):
    from typer.testing import CliRunner

    from rosetool.cli.bench import app
    curve = {"mode": "sweep", "sweep": {"parameter": "concurrency", "command": "online"}, "model_id": "m",
             "backend": "rosetool", "date": "2026-11-23T21:00:00", "environment": {"device": "cpu"},
             "points": [{"concurrency": c, "output_throughput": 10.0 * c, "median_e2el_ms": 100.0 + c,
                         "request_throughput": 1.0 * c} for c in (1, 4, 16)]}
    paths = []
    for name, doc in (("a", curve), ("b", curve), ("c", OURS)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    png = tmp_path / "sweeps.png"
    result = CliRunner().invoke(app, ["compare", str(paths[0]), str(paths[1]), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG" and "warning" not in result.stderr
    assert "better" in result.stdout and "higher" in result.stdout and "lower" in result.stdout
    png = tmp_path / "ratios.png"
    result = CliRunner().invoke(app, ["compare", str(paths[2]), str(paths[0]), "--plot", str(png)])
    assert result.exit_code == 0 and png.exists()
    assert "warning:" in result.stderr and "not comparable" in result.stderr


def test_plot_axes_are_words_with_units():
    from rosetool.bench.plot import axis_label
    assert axis_label("median_e2el_ms") == "median end-to-end latency (ms)"
    assert axis_label("output_throughput") == "output throughput (tokens/s)"
    assert axis_label("p99_itl_ms") == "p99 itl (ms)"
