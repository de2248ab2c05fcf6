"""`rosetool serve` benched over HTTP in one command: start it on a free loopback port, bench it
with the `openai` backend's client, stop it. The workload and metrics are those of the in-process
`rosetool` backend, so the two runs compare side by side (`rosetool bench compare`).
"""

from __future__ import annotations

from dataclasses import replace

from rosetool.bench.backends.base import BackendConfig, OnDone, OnTokens, Schedule, no_tokens
from rosetool.bench.backends.model import model_label, resolve_model
from rosetool.bench.backends.openai import OpenAIBackend
from rosetool.bench.metrics import RequestResult
from rosetool.bench.workload import Request
from rosetool.serve.process import ServerProcess


def serve_args(cfg: BackendConfig) -> list[str]:
    """The engine options of the in-process backend, as `rosetool serve` flags."""
    args = [str(resolve_model(cfg)), "--served-model-name", cfg.served_model_name or model_label(cfg),
            "--max-num-seqs", str(cfg.max_num_seqs), "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
            "--block-size", str(cfg.block_size), "--tp", str(cfg.tensor_parallel_size),
            "--ep", str(cfg.expert_parallel_size)]
    for flag, value in (("--dtype", cfg.dtype), ("--device", cfg.device), ("--num-kv-blocks", cfg.num_kv_blocks),
                        ("--max-model-len", cfg.max_model_len)):
        if value is not None:
            args += [flag, str(value)]
    if not cfg.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if cfg.enforce_eager:
        args.append("--enforce-eager")
    for adapter in cfg.adapters:
        args += ["--adapter", adapter]
    return args


class RosetoolServerBackend:
    name = "rosetool-server"

    def __init__(self, cfg: BackendConfig):
        if max(cfg.tensor_parallel_size, cfg.expert_parallel_size) > 1:   # a bad size: one line, no server started
            from rosetool.converters.sources import open_checkpoint
            from rosetool.runtime.tp_shard import check_shardable

            check_shardable(open_checkpoint(resolve_model(cfg)), cfg.tensor_parallel_size, cfg.expert_parallel_size)
        self.server = ServerProcess(serve_args(cfg)).start()
        try:
            self.client = OpenAIBackend(replace(cfg, base_url=self.server.base_url))
        except BaseException:
            self.server.stop()
            raise
        self.model_id, self.vocab = self.client.model_id, self.client.vocab

    def run(self, requests: list[Request], schedule: Schedule, on_done: OnDone,
            on_tokens: OnTokens = no_tokens) -> list[RequestResult]:
        return self.client.run(requests, schedule, on_done, on_tokens)

    def close(self) -> None:
        self.server.stop()
