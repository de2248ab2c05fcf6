"""`rosetool bench online --backend rosetool-server`: one command starts `rosetool serve`, benches it
over HTTP with the workload the in-process backend gets, saves the JSON and stops the server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rosetool.bench.backends.base import BackendConfig
from rosetool.bench.backends.rosetool_server import serve_args
from rosetool.cli.bench import app
from rosetool.errors import RosetoolError
from rosetool.serve.process import ServerProcess
from test_bench_support import tiny_model  # noqa: F401  (fixture)

SMALL = ["--num-prompts", "4", "--input-len", "6", "--output-len", "5", "--warmup", "0", "--request-rate", "50",
         "--max-concurrency", "2"]


def test_server_and_in_process_runs_compare_side_by_side(tiny_model, tmp_path):
    saved = {}
    for backend in ("rosetool", "rosetool-server"):
        saved[backend] = tmp_path / f"{backend}.json"
        result = CliRunner().invoke(app, ["online", "--backend", backend, "--model", str(tiny_model), *SMALL,
                                          "--num-kv-blocks", "64", "--save-result", str(saved[backend]),
                                          "--save-detailed"])
        assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(saved["rosetool-server"].read_text())
    assert doc["backend"] == "rosetool-server" and doc["model_id"] == str(tiny_model)
    assert doc["completed"] == 4 and doc["failed"] == 0 and doc["total_output_tokens"] == 20
    assert [len(itl) for itl in doc["itls"]] == [4] * 4 and all(t > 0 for t in doc["ttfts"])
    assert doc["config"]["backend"]["num_kv_blocks"] == 64
    result = CliRunner().invoke(app, ["compare", str(saved["rosetool"]), str(saved["rosetool-server"]), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["metric"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows["completed"]["values"] == [4, 4] and rows["failed"]["values"] == [0, 0]
    assert all(v > 0 for v in rows["mean_ttft_ms"]["values"])


def test_engine_options_reach_the_server():
    cfg = BackendConfig(name="rosetool-server", dtype="float32", num_kv_blocks=32, max_model_len=96,
                        enable_prefix_caching=False, max_num_seqs=3, tensor_parallel_size=2, expert_parallel_size=2)
    args = serve_args(cfg)
    for flag, value in (("--dtype", "float32"), ("--num-kv-blocks", "32"), ("--max-model-len", "96"),
                        ("--max-num-seqs", "3"), ("--served-model-name", "default"), ("--tp", "2"), ("--ep", "2")):
        assert args[args.index(flag) + 1] == value
    assert "--no-enable-prefix-caching" in args and "--device" not in args


def test_a_server_that_cannot_start_is_a_one_line_error(tmp_path):
    with pytest.raises(RosetoolError, match="did not become healthy.*no such file"):
        ServerProcess([str(tmp_path / "missing")], startup_timeout_s=60).start()
