"""Every bench command end to end on a tiny local GPT-2, for the rosetool and hf backends."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rosetool.cli.bench import app
from test_bench_support import tiny_model  # noqa: F401  (fixture)

BACKENDS = ["rosetool", "hf"]
SMALL = ["--num-prompts", "3", "--input-len", "6", "--output-len", "4", "--warmup", "0"]


def bench(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_offline(tiny_model, backend):
    doc = bench("offline", "--backend", backend, "--model", str(tiny_model), *SMALL, "--runs", "2")
    assert doc["mode"] == "offline" and doc["backend"] == backend
    assert len(doc["runs"]) == 2
    assert all(run["completed"] == 3 and run["total_output_tokens"] == 12 for run in doc["runs"])
    assert doc["total_input_tokens"] == 18
    for key in ("request_throughput", "input_throughput", "output_throughput", "total_token_throughput", "duration"):
        assert doc[key] > 0 and doc[f"mean_{key}"] > 0
    assert doc["output_throughput"] == pytest.approx(2 * doc["input_throughput"] / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_saves_config_metrics_and_details(tiny_model, backend, tmp_path):
    out = tmp_path / "online.json"
    result = invoke("online", "--backend", backend, "--model", str(tiny_model), *SMALL, "--request-rate", "40",
                 "--burstiness", "0.5", "--max-concurrency", "2", "--percentiles", "50,95",
                 "--slo", "ttft:60000,tpot:60000", "--save-result", str(out), "--save-detailed")
    assert result.exit_code == 0, result.output
    assert "mean_ttft_ms" in result.stdout  # the rich table
    doc = json.loads(out.read_text())
    assert doc["completed"] == 3 and doc["failed"] == 0 and doc["total_output_tokens"] == 12
    assert doc["request_goodput"] == pytest.approx(doc["request_throughput"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert {f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", f"p95_{name}_ms"} <= doc.keys()
    assert doc["mean_ttft_ms"] <= doc["mean_e2el_ms"]
    assert doc["config"]["backend"]["name"] == backend
    assert doc["config"]["workload"]["kind"] == "random"
    assert doc["config"]["run"]["burstiness"] == 0.5
    assert {"torch", "transformers", "rosetool", "device"} <= doc["environment"].keys()
    assert doc["date"] and doc["model_id"] == str(tiny_model)
    assert doc["output_lens"] == [4, 4, 4] and doc["input_lens"] == [6, 6, 6]
    assert [len(itl) for itl in doc["itls"]] == [3, 3, 3]
    assert all(t > 0 for t in doc["ttfts"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_latency(tiny_model, backend):
    extra = ["--hf-static-cache"] if backend == "hf" else []
    doc = bench("latency", "--backend", backend, "--model", str(tiny_model), *SMALL, "--batch-size", "2",
                "--runs", "2", *extra)
    assert doc["mode"] == "latency" and len(doc["runs"]) == 2
    assert doc["decode_steps"] == 3
    assert 0 < doc["prefill_ms"] < doc["latency_ms"]
    assert doc["decode_step_ms"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_all_reproduces_naive_offline_online(tiny_model, backend):
    doc = bench("--backend", backend, "--model", str(tiny_model), *SMALL, "--runs", "1")
    assert doc["mode"] == "all"
    assert list(doc["results"]) == ["naive", "offline", "online"]
    assert all(r["completed"] == 3 for r in doc["results"].values())
    assert "mean_ttft_ms" in doc["results"]["online"]


@pytest.mark.parametrize(("backend", "flag", "mode"), [("rosetool", "--concurrency", "online"),
                                                       ("hf", "--request-rate", "online"),
                                                       ("hf", "--batch-size", "latency")])
def test_sweep_table_json_and_png(tiny_model, backend, flag, mode, tmp_path):
    png, saved = tmp_path / "sweep.png", tmp_path / "sweep.json"
    result = invoke("sweep", "--backend", backend, "--model", str(tiny_model), *SMALL, "--runs", "1",
                 flag, "1,2", "--plot", str(png), "--save-result", str(saved))
    assert result.exit_code == 0, result.output
    assert "sweep over" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(saved.read_text())
    assert doc["sweep"]["command"] == mode and doc["sweep"]["values"] == [1, 2] and doc["plot"] == str(png)
    assert [p["mode"] for p in doc["points"]] == [mode, mode]
    assert all(p["output_throughput"] > 0 for p in doc["points"])


def test_workloads_through_the_runtime(tiny_model, tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text('{"prompt": "the quick brown fox", "output_len": 2}\n{"prompt": [5, 6, 7]}\n')
    doc = bench("offline", "--model", str(tiny_model), "--workload", "jsonl", "--dataset-path", str(data),
                "--output-len", "3", "--warmup", "0", "--runs", "1")
    assert doc["total_input_tokens"] == 7 and doc["total_output_tokens"] == 5
    doc = bench("offline", "--model", str(tiny_model), "--workload", "prefix", "--prefix-len", "16",
                "--num-prefixes", "1", *SMALL, "--runs", "1")
    assert doc["total_input_tokens"] == 3 * 22
    doc = bench("offline", "--model", str(tiny_model), "--workload", "fixed", "--prompt", "once upon a time",
                *SMALL, "--runs", "1")
    assert doc["total_input_tokens"] == 12


def test_profile_writes_chrome_trace(tiny_model, tmp_path):
    bench("offline", "--model", str(tiny_model), *SMALL, "--runs", "1", "--profile", str(tmp_path / "prof"))
    trace = json.loads((tmp_path / "prof" / "offline.json").read_text())
    assert trace["traceEvents"]


def test_compare_reads_saved_results(tiny_model, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for backend, path in (("rosetool", a), ("hf", b)):
        assert invoke("offline", "--backend", backend, "--model", str(tiny_model), *SMALL, "--runs", "1",
                   "--save-result", str(path)).exit_code == 0
    result = invoke("compare", str(a), str(b), "--json")
    assert result.exit_code == 0, result.output
    rows = {row["metric"]: row for row in json.loads(result.stdout)["rows"]}
    thr = rows["request_throughput"]
    assert thr["ratios"][0] == pytest.approx(thr["values"][1] / thr["values"][0])
    assert rows["completed"]["ratios"] == [1.0]
    table = invoke("compare", str(a), str(b))
    assert table.exit_code == 0 and "b / a" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["offline", "--backend", "tgi"], "--backend 'tgi'"),
    (["online", "--slo", "ttft"], "--slo item"),
    (["online", "--percentiles", "50,200"], "--percentiles"),
    (["online", "--request-rate", "0"], "--request-rate"),
    (["offline", "--runs", "0"], "--runs"),
    (["offline", "--dtype", "fp8"], "--dtype"),
    (["offline", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["offline", "--workload", "jsonl"], "--dataset-path"),
    (["offline", "--profile", "p", "--backend", "openai", "--base-url", "http://x"], "--profile"),
    (["--mode", "turbo"], "--mode 'turbo'"),
    (["--backend", "hf", "offline"], "put --backend after the subcommand"),
    (["sweep", "--concurrency", "1", "--batch-size", "2"], "sweep takes one of"),
    (["sweep", "--concurrency", "1,x"], "--concurrency"),
    (["compare", "only.json"], "at least two"),
])
def test_bad_flags_give_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_compare_rejects_non_results(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    (tmp_path / "y.json").write_text("not json")
    result = invoke("compare", str(tmp_path / "x.json"), str(tmp_path / "y.json"))
    assert result.exit_code == 2 and "not a benchmark result" in result.stderr
    result = invoke("compare", str(tmp_path / "y.json"), str(tmp_path / "x.json"))
    assert result.exit_code == 2 and "not a JSON file" in result.stderr


def test_unknown_option_is_a_usage_error():
    assert invoke("offline", "--no-such-flag").exit_code == 2


def test_root_cli_runs_default_model_with_no_model_given(cli):
    result = cli("bench", "offline", *SMALL, "--runs", "1", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["model_id"] == "default" and doc["completed"] == 3


def test_root_cli_error_is_one_line(cli):
    result = cli("bench", "online", "--slo", "speed:1")
    assert result.code == 2 and result.err.startswith("Error: --slo item") and result.err.count("\n") == 1


def test_hf_model_id_resolves_local_folder_and_reports_uncached_ids(tiny_model):
    doc = bench("offline", "--hf-model-id", str(tiny_model), *SMALL, "--runs", "1")
    assert doc["model_id"] == str(tiny_model) and doc["completed"] == 3
    result = invoke("offline", "--hf-model-id", "nobody-rosetool/no-such-model")
    assert result.exit_code == 2 and "not in the huggingface_hub cache" in result.stderr


def test_hf_backend_exports_a_native_folder(tiny_model, tmp_path):
    from rosetool.converters.api import convert

    convert(tiny_model, tmp_path / "native", to="native")
    doc = bench("offline", "--backend", "hf", "--model", str(tmp_path / "native"), *SMALL, "--runs", "1")
    assert doc["completed"] == 3 and doc["total_output_tokens"] == 12
