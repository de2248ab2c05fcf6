"""On CPU the sizes the user did not set shrink to about a minute of work; given flags and CUDA are untouched."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rosetool.bench.cli_options import Options
from rosetool.bench.device_fit import CPU_WORKLOAD, fit_to_device
from rosetool.cli.bench import app
from test_bench_support import tiny_model  # noqa: F401  (fixture)

SIZES = set(CPU_WORKLOAD)


def test_cpu_scales_only_defaulted_sizes_and_says_how_to_get_the_full_workload() -> None:
    o = Options(device="cpu", num_prompts=5)
    fitted, note = fit_to_device(o, SIZES - {"num_prompts"})
    assert fitted.num_prompts == 5   # given: kept
    assert (fitted.input_len, fitted.output_len, fitted.runs) == (CPU_WORKLOAD["input_len"],
                                                                  CPU_WORKLOAD["output_len"], CPU_WORKLOAD["runs"])
    assert note.startswith("CPU: scaled-down default workload")
    assert f"--input-len {Options().input_len}" in note and f"--runs {Options().runs}" in note
    assert "--num-prompts" not in note


def test_cuda_and_servers_keep_the_documented_workload() -> None:
    for o in (Options(device="cuda"), Options(backend="openai", base_url="http://x")):
        fitted, note = fit_to_device(o, SIZES)
        assert fitted == o and note is None


def test_everything_given_means_nothing_to_say() -> None:
    assert fit_to_device(Options(device="cpu"), set()) == (Options(device="cpu"), None)


def test_bare_sweep_runs_the_default_concurrency_sweep_scaled_to_cpu(tiny_model, tmp_path) -> None:
    png = tmp_path / "s.png"
    result = CliRunner().invoke(app, ["sweep", "--model", str(tiny_model), "--device", "cpu", "--warmup", "0",
                                      "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["sweep"] == {"parameter": "concurrency", "command": "online", "values": [1, 4, 16]}
    assert doc["config"]["workload"]["num_prompts"] == CPU_WORKLOAD["num_prompts"]
    assert all(p["total_output_tokens"] == CPU_WORKLOAD["num_prompts"] * CPU_WORKLOAD["output_len"]
               for p in doc["points"])
    assert "scaled-down" in result.stderr and png.exists()
    assert [line.split("]")[0] for line in result.stderr.splitlines() if line.startswith("[")] == ["[1/3", "[2/3", "[3/3"]
