"""The public entry point: `LLM` owns model, scheduler and runner, and turns steps into outputs."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from rosetool.errors import RosetoolError
from rosetool.runtime.block_manager import BlockManager
from rosetool.runtime.config import EngineConfig, resolve_device, resolve_dtype
from rosetool.runtime.detokenizer import Detokenizer
from rosetool.runtime.layout import ParallelLayout
from rosetool.runtime.model_runner import ModelRunner
from rosetool.runtime.outputs import GenerationOutput, StepOutput
from rosetool.runtime.sampling_params import SamplingParams
from rosetool.runtime.scheduler import Scheduler
from rosetool.runtime.sequence import Sequence


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detokenizer: Detokenizer | None

    def output(self) -> GenerationOutput:
        seq = self.seq
        return GenerationOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=self.detokenizer.text if self.detokenizer else None,
            finish_reason=seq.finish_reason or "abort",
            logprobs=list(seq.logprobs) if seq.params.logprobs else None)


class LLM:
    def __init__(self, model: str | os.PathLike, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, block_size: int = 16,
                 num_kv_blocks: int | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                 adapters: tuple[str, ...] = ()):
        """`tensor_parallel_size` N > 1 shards the model over N processes (this one is rank 0), or over
        the ranks `torchrun` started; there, `LLM()` on a rank > 0 serves rank 0 and then exits.
        `expert_parallel_size` M > 1 places an MoE model's experts whole on M groups of those ranks
        (max(N, M) processes; runtime/layout.py)."""
        from rosetool.runtime.loader import load_model

        config = EngineConfig(resolve_device(device), resolve_dtype(dtype), gpu_memory_utilization,
                              max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks,
                              max_model_len, enable_prefix_caching, enforce_eager, tuple(map(str, adapters)))
        layout = ParallelLayout(tensor_parallel_size, expert_parallel_size)
        if layout.world > 1:
            from rosetool.runtime import tp_runner

            self.model, info, self.runner = tp_runner.start(str(model), config, layout)
        else:
            self.model, info = load_model(model, dtype=config.dtype, device=config.device, adapters=config.adapters)
            self.runner = ModelRunner(self.model, config)
        self.model.eval()
        self._model_args = info.args
        self.tokenizer = info.tokenizer
        self.eos_token_ids = set(info.eos_token_ids)
        if num_kv_blocks is not None and max_model_len is not None and self.runner.max_model_len < max_model_len:
            self.close()
            raise RosetoolError(
                f"LLM: max_model_len={max_model_len} does not fit the KV pool "
                f"({self.runner.num_kv_blocks} blocks of {block_size} tokens); raise num_kv_blocks")
        self.max_model_len = self.runner.max_model_len
        blocks = BlockManager(self.runner.num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(blocks, max_num_seqs, max_num_batched_tokens)
        self._requests: dict[str, _Request] = {}
        self._aborted: list[StepOutput] = []
        self._ids = itertools.count()

    @property
    def model_args(self):
        return self._model_args

    def close(self) -> None:
        """End the tensor-parallel workers (a no-op on one device); the engine is unusable after."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        return self._add(prompt, params, request_id).seq.request_id

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None or request.seq.is_finished:
            return
        self.scheduler.finish(request.seq, "abort")
        delta = request.detokenizer.take_delta(final=True) if request.detokenizer else None
        self._aborted.append(StepOutput(request_id, [], True, "abort", delta))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        events, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():  # cannot happen by construction; never spin silently
                raise RuntimeError("scheduler made no progress with requests pending")
            return events
        sampled = [s for i, s in enumerate(batch.seqs) if batch.completes_prefill(i)]
        tokens, logprobs = self.runner.run(batch)
        self.scheduler.advance(batch)
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            events.append(self._append_token(self._requests[seq.request_id], token, logprob))
        return events

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RosetoolError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = [self._add(p, sp, None) for p, sp in zip(prompts, params)]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate")
        while any(not r.seq.is_finished for r in requests):
            done = sum(e.finished for e in self.step())
            if bar is not None:
                bar.update(done)
        if bar is not None:
            bar.close()
        return [r.output() for r in requests]

    def _add(self, prompt: str | list[int], params: SamplingParams | None,
             request_id: str | None) -> _Request:
        params = params or SamplingParams()
        token_ids = self._tokenize(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise RosetoolError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, token_ids, len(token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        detokenizer = Detokenizer(self.tokenizer, token_ids, params.stop) if self.tokenizer else None
        request = _Request(seq, detokenizer)
        self._requests[request_id] = request
        self.scheduler.add(seq)
        return request

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RosetoolError("this model has no tokenizer; pass prompts as lists of token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        vocab = self.model_args.vocab_size
        if not token_ids:
            raise RosetoolError("prompt is empty")
        if any(not 0 <= t < vocab for t in token_ids):
            raise RosetoolError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise RosetoolError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                f"(KV pool: {self.runner.num_kv_blocks} blocks of {self.runner.block_size} tokens)")
        return token_ids

    def _append_token(self, request: _Request, token: int, logprob: float | None) -> StepOutput:
        seq, params, detok = request.seq, request.seq.params, request.detokenizer
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif detok is not None and detok.add(token):
            reason = "stop"
        if reason is None and (seq.num_output_tokens >= params.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        delta = detok.take_delta(final=reason is not None) if detok else None
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        return StepOutput(seq.request_id, [token], reason is not None, reason, delta, logprob)
