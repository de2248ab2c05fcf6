"""The bundled paged-KV runtime, driven step by step in process.

Driving `add_request`/`step` (rather than `generate`) is what lets one loop serve offline, naive and
online runs: requests join the running batch as they arrive, and each token is stamped the moment
the step that produced it returns.
"""

from __future__ import annotations

import time

from rosetool.bench.backends.base import Admission, BackendConfig, OnDone, OnTokens, Schedule, fail, no_tokens
from rosetool.bench.backends.model import make_vocab, model_label, resolve_model
from rosetool.bench.metrics import RequestResult
from rosetool.bench.workload import Request, Vocab
from rosetool.errors import RosetoolError


class RosetoolBackend:
    name = "rosetool"

    def __init__(self, cfg: BackendConfig):
        from rosetool.runtime import LLM

        self.cfg = cfg
        self.model_id = model_label(cfg)
        self.llm = LLM(
            str(resolve_model(cfg)),
            dtype=cfg.dtype,
            device=cfg.device,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            block_size=cfg.block_size,
            num_kv_blocks=cfg.num_kv_blocks,
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size,
            adapters=cfg.adapters,
            expert_parallel_size=cfg.expert_parallel_size,
        )
        self.vocab: Vocab = make_vocab(self.llm.tokenizer, getattr(self.llm.model_args, "vocab_size", None))

    def _params(self, request: Request):
        from rosetool.runtime import SamplingParams

        return SamplingParams(
            temperature=self.cfg.temperature,
            seed=self.cfg.seed,
            max_tokens=request.output_len,
            ignore_eos=self.cfg.ignore_eos,
        )

    def run(self, requests: list[Request], schedule: Schedule, on_done: OnDone,
            on_tokens: OnTokens = no_tokens) -> list[RequestResult]:
        results = [RequestResult(prompt_len=r.prompt_len) for r in requests]
        owner: dict[str, int] = {}
        admission = Admission(schedule)
        try:
            while not admission.exhausted or owner:
                for i, sent in admission.due():
                    results[i].start = sent
                    self._submit(requests[i], results[i], i, owner, admission, on_done)
                if not owner:
                    admission.wait()
                    continue
                self._step(results, owner, admission, on_done, on_tokens)
        finally:  # interrupted: leave the engine empty for whoever uses it next
            for request_id in owner:
                self.llm.abort(request_id)
        return results

    def _submit(self, request: Request, result: RequestResult, i: int, owner: dict[str, int],
                admission: Admission, on_done: OnDone) -> None:
        """A request the engine refuses (too long, bad ids) is a failed request, not a crash."""
        try:
            owner[self.llm.add_request(request.prompt, self._params(request))] = i
        except (RosetoolError, ValueError, RuntimeError) as err:
            fail(result, err)
            admission.release(result.end)
            on_done(result)

    def _step(self, results: list[RequestResult], owner: dict[str, int], admission: Admission,
              on_done: OnDone, on_tokens: OnTokens) -> None:
        outputs = self.llm.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id not in owner:
                continue
            result = results[owner[out.request_id]]
            result.token_times.extend([now] * len(out.new_token_ids))
            result.output_tokens += len(out.new_token_ids)
            on_tokens(len(out.new_token_ids))
            if out.finished:
                result.end = now
                del owner[out.request_id]
                admission.release(now)
                on_done(result)

    def close(self) -> None:
        """`run` never leaves requests in the engine and memory goes with `llm`; only tensor-parallel
        worker processes need ending."""
        self.llm.close()
