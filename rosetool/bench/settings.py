"""From parsed flags to the three configurations a run needs, rejecting bad values before any model loads."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rosetool.bench.backends import BACKENDS, BackendConfig
from rosetool.bench.cli_options import Options
from rosetool.bench.metrics import parse_percentiles, parse_slo
from rosetool.bench.runner import RunSettings
from rosetool.bench.workload import DEFAULT_PROMPT, WorkloadSpec
from rosetool.errors import RosetoolError

DTYPES = ("float32", "float16", "bfloat16")


def _check(o: Options) -> None:
    rules = [
        (o.backend in BACKENDS, f"--backend {o.backend!r}: choose one of {', '.join(BACKENDS)}"),
        (o.dtype in (None, *DTYPES), f"--dtype {o.dtype!r}: choose one of {', '.join(DTYPES)}"),
        (o.device in (None, "cpu", "cuda") or str(o.device).startswith("cuda:"), f"--device {o.device!r}: cpu or cuda"),
        (o.warmup >= 0 and o.runs >= 1, "--warmup must be >= 0 and --runs >= 1"),
        (o.max_concurrency is None or o.max_concurrency >= 1, "--max-concurrency must be at least 1"),
        (o.batch_size >= 1 and o.max_num_seqs >= 1, "--batch-size and --max-num-seqs must be at least 1"),
        (o.request_rate > 0 and o.burstiness > 0, "--request-rate and --burstiness must be greater than 0"),
        (o.temperature >= 0, "--temperature must be >= 0"),
        (not (o.profile and o.backend in ("openai", "rosetool-server")),
         f"--profile traces an in-process backend; not with --backend {o.backend}"),
        (o.base_url is None or o.backend == "openai", "--base-url is only used by --backend openai"),
        (not o.adapter or o.backend in ("rosetool", "rosetool-server"),
         f"--adapter is merged by rosetool's runtime; not with --backend {o.backend}"),
    ]
    for ok, message in rules:
        if not ok:
            raise RosetoolError(message)


def workload_spec(o: Options) -> WorkloadSpec:
    spec = WorkloadSpec(
        kind=o.workload, num_prompts=o.num_prompts, input_len=o.input_len, output_len=o.output_len,
        range_ratio=o.range_ratio, prompt=o.prompt or DEFAULT_PROMPT, path=o.dataset_path,
        prefix_len=o.prefix_len, num_prefixes=o.num_prefixes, seed=o.seed,
    )
    spec.validate()
    return spec


def run_settings(o: Options) -> RunSettings:
    return RunSettings(
        warmup=o.warmup, runs=o.runs, request_rate=o.request_rate, burstiness=o.burstiness,
        max_concurrency=o.max_concurrency, percentiles=parse_percentiles(o.percentiles), slo=parse_slo(o.slo),
        batch_size=o.batch_size, profile_dir=o.profile,
    )


def backend_config(o: Options) -> BackendConfig:
    return BackendConfig(
        name=o.backend, model=o.model, hf_model_id=o.hf_model_id, dtype=o.dtype, device=o.device,
        temperature=o.temperature, ignore_eos=o.ignore_eos, seed=o.seed, max_num_seqs=o.max_num_seqs,
        max_num_batched_tokens=o.max_num_batched_tokens, block_size=o.block_size, num_kv_blocks=o.num_kv_blocks,
        max_model_len=o.max_model_len, gpu_memory_utilization=o.gpu_memory_utilization,
        enable_prefix_caching=o.enable_prefix_caching, enforce_eager=o.enforce_eager,
        tensor_parallel_size=o.tp, expert_parallel_size=o.ep, adapters=tuple(o.adapter or ()),
        hf_static_cache=o.hf_static_cache, base_url=o.base_url,
        served_model_name=o.served_model_name,
        stream=o.stream, timeout_s=o.request_timeout,
    )


def build(o: Options) -> tuple[BackendConfig, WorkloadSpec, RunSettings]:
    _check(o)
    return backend_config(o), workload_spec(o), run_settings(o)


def saved_config(cfg: BackendConfig, spec: WorkloadSpec, settings: RunSettings) -> dict[str, Any]:
    return {"backend": asdict(cfg), "workload": asdict(spec), "run": asdict(settings)}
