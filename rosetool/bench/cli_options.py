"""Every `rosetool bench` flag, declared once and shared by the commands that take it.

Typer reads parameters from a function's signature, so `bench_command` builds that signature from
the named groups below and hands the command one `Options` object. That keeps ~40 flags in one
table instead of repeated across five commands, and makes every command turn a `RosetoolError`
into the same one-line `Error: ...` with exit code 2 that the root CLI uses.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from rosetool.errors import RosetoolError


@dataclass
class Options:
    backend: str = "rosetool"
    model: Optional[Path] = None
    hf_model_id: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    base_url: Optional[str] = None
    served_model_name: Optional[str] = None
    stream: bool = True
    request_timeout: float = 600.0
    hf_static_cache: bool = False
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    max_model_len: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tp: int = 1
    adapter: Optional[list[str]] = None
    ep: int = 1
    workload: str = "random"
    dataset_path: Optional[Path] = None
    prompt: Optional[str] = None
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    prefix_len: int = 64
    num_prefixes: int = 4
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    warmup: int = 1
    runs: int = 3
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    percentiles: str = "50,90,99"
    slo: Optional[str] = None
    batch_size: int = 8
    mode: str = "all"
    concurrency_list: Optional[str] = None
    request_rate_list: Optional[str] = None
    batch_size_list: Optional[str] = None
    plot: Path = Path("bench-sweep.png")
    save_result: Optional[Path] = None
    save_detailed: bool = False
    profile: Optional[Path] = None
    json_out: bool = False


O = typer.Option
FLAGS: dict[str, typer.models.OptionInfo] = {
    "backend": O("--backend", help="rosetool (bundled runtime), hf (transformers generate), openai (HTTP server) or "
                                        "rosetool-server (starts `rosetool serve`, benches it over HTTP, stops it)."),
    "model": O("--model", help="Local model folder: native, HF or Megatron."),
    "hf_model_id": O("--hf-model-id", help="Hub id or folder, resolved through the huggingface_hub cache."),
    "dtype": O("--dtype", help="float32, float16 or bfloat16 (default: the model's own)."),
    "device": O("--device", help="cpu or cuda (default: cuda when available)."),
    "base_url": O("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000"),
    "served_model_name": O("--served-model-name", help="openai backend: 'model' field (default: first of /v1/models)."),
    "stream": O("--stream/--no-stream", help="openai backend: stream tokens (needed for TTFT/ITL)."),
    "request_timeout": O("--request-timeout", help="openai backend: seconds per request."),
    "hf_static_cache": O("--hf-static-cache", help="hf backend: cache_implementation='static'."),
    "max_num_seqs": O("--max-num-seqs", help="rosetool: running sequences; hf: largest generate batch."),
    "max_num_batched_tokens": O("--max-num-batched-tokens", help="rosetool: tokens per engine step."),
    "block_size": O("--block-size", help="rosetool: KV cache block size."),
    "num_kv_blocks": O("--num-kv-blocks", help="rosetool: KV blocks (default: sized from memory)."),
    "max_model_len": O("--max-model-len", help="rosetool: longest sequence."),
    "gpu_memory_utilization": O("--gpu-memory-utilization", help="rosetool: fraction of GPU memory to use."),
    "enable_prefix_caching": O("--enable-prefix-caching/--no-enable-prefix-caching", help="rosetool: prefix cache."),
    "enforce_eager": O("--enforce-eager", help="rosetool: no CUDA graphs."),
    "tp": O("--tp", help="rosetool: tensor-parallel ranks (processes)."),
    "adapter": O("--adapter", help="rosetool, rosetool-server: LoRA folder (HF PEFT or Megatron) merged at "
                 "load; repeat to apply several in order."),
    "ep": O("--ep", help="rosetool: expert-parallel ranks (MoE; processes shared with --tp)."),
    "workload": O("--workload", help="random, fixed, jsonl, sharegpt or prefix."),
    "dataset_path": O("--dataset-path", help="File for --workload jsonl or sharegpt."),
    "prompt": O("--prompt", help="Text repeated by --workload fixed."),
    "num_prompts": O("--num-prompts", help="Requests per pass."),
    "input_len": O("--input-len", help="Prompt tokens (random/prefix: the part after the prefix)."),
    "output_len": O("--output-len", help="Tokens to generate per request."),
    "range_ratio": O("--range-ratio", help="Lengths drawn uniformly from len*(1-r)..len*(1+r)."),
    "prefix_len": O("--prefix-len", help="prefix workload: shared prefix tokens."),
    "num_prefixes": O("--num-prefixes", help="prefix workload: distinct prefixes."),
    "ignore_eos": O("--ignore-eos/--no-ignore-eos", help="Generate exactly --output-len tokens."),
    "temperature": O("--temperature", help="0 is greedy."),
    "seed": O("--seed", help="Seeds workload, arrivals and sampling."),
    "warmup": O("--warmup", help="Unmeasured passes first."),
    "runs": O("--runs", help="Measured passes (median and mean reported)."),
    "request_rate": O("--request-rate", help="Requests/s; inf sends all at once."),
    "burstiness": O("--burstiness", help="Gamma shape of inter-arrival times; 1.0 is Poisson."),
    "max_concurrency": O("--max-concurrency", help="Most requests in flight."),
    "percentiles": O("--percentiles", help="Comma-separated percentiles to report."),
    "slo": O("--slo", help="Goodput SLOs, e.g. ttft:200,tpot:50,e2el:2000 (ms)."),
    "batch_size": O("--batch-size", help="latency: requests in the fixed batch."),
    "mode": O("--mode", help="naive, offline, online or all (naive + offline + online)."),
    "concurrency_list": O("--concurrency", help="Sweep online max concurrency, e.g. 1,8,64,256."),
    "request_rate_list": O("--request-rate", help="Sweep online request rate, e.g. 1,4,16."),
    "batch_size_list": O("--batch-size", help="Sweep latency batch size, e.g. 1,8,32."),
    "plot": O("--plot", help="PNG file for the throughput/latency plot."),
    "save_result": O("--save-result", help="Write the run's configuration and metrics as JSON."),
    "save_detailed": O("--save-detailed", help="Add per-request arrays to the saved JSON."),
    "profile": O("--profile", help="Folder for torch profiler Chrome traces of the measured pass."),
    "json_out": O("--json", help="Print the result JSON instead of tables."),
}

MODEL = ["backend", "model", "hf_model_id", "dtype", "device", "base_url", "served_model_name", "stream",
         "request_timeout", "hf_static_cache", "max_num_seqs", "max_num_batched_tokens", "block_size",
         "num_kv_blocks", "max_model_len", "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager",
         "tp", "ep", "adapter"]
WORKLOAD = ["workload", "dataset_path", "prompt", "num_prompts", "input_len", "output_len", "range_ratio",
            "prefix_len", "num_prefixes", "ignore_eos", "temperature", "seed"]
OUTPUT = ["save_result", "save_detailed", "profile", "json_out"]
REPEAT = ["warmup", "runs"]
ARRIVALS = ["request_rate", "burstiness", "max_concurrency", "percentiles", "slo"]
SERVING = ["burstiness", "percentiles", "slo"]
SWEEP = ["concurrency_list", "request_rate_list", "batch_size_list", "plot"]

_HINTS = typing.get_type_hints(Options)
_DEFAULTS = {f.name: f.default for f in fields(Options)}
err_console = Console(stderr=True)


def one_line_errors(func: Callable) -> Callable:
    """`RosetoolError` -> `Error: ...` on stderr and exit 2, as the root CLI does (ROSETOOL_DEBUG=1: raise)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RosetoolError as err:
            if os.environ.get("ROSETOOL_DEBUG"):
                raise
            err_console.print(f"Error: {err}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def bench_command(*groups: list[str]) -> Callable[[Callable[[typer.Context, Options], None]], Callable]:
    """Give `func(ctx, options)` a Typer signature made of the flags in `groups` (first mention wins)."""
    names = list(dict.fromkeys(name for group in groups for name in group))

    def decorate(func: Callable[[typer.Context, Options], None]) -> Callable:
        @one_line_errors
        def command(ctx: typer.Context, **kwargs) -> None:
            func(ctx, Options(**kwargs))

        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS[n],
                                     annotation=Annotated[_HINTS[n], FLAGS[n]]) for n in names]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        return command
    return decorate


def flags_given(o: Options) -> list[str]:
    """Flags whose value differs from the default: what the user actually set."""
    return [flag_name(f.name) for f in fields(Options) if getattr(o, f.name) != f.default]


def flag_name(name: str) -> str:
    """In `Annotated` style Typer keeps the first declaration in `default`."""
    info = FLAGS[name]
    return str((info.param_decls or (info.default,))[0]).split("/")[0]
