"""transformers `generate`, batched with left padding: the reference every runtime is measured against.

`generate` has no per-token callback, so a `StoppingCriteria` doubles as the clock: transformers
calls it once after every decoding step, with the sequences so far. It stamps the time (after a
CUDA sync, so the stamp is when the token exists) and stops each row at its own output length,
which lets one batch hold requests with different `output_len`. Requests that arrive while a
batch runs wait for the next batch: static batching, which is what `generate` can do.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rosetool.bench.backends.base import Admission, BackendConfig, OnDone, OnTokens, Schedule, fail, no_tokens
from rosetool.bench.backends.model import hf_folder, make_vocab, model_label, resolve_model
from rosetool.bench.metrics import RequestResult
from rosetool.bench.workload import Request
from rosetool.dtypes import parse_dtype
from rosetool.runtime.loader import load_tokenizer



class StepClock(StoppingCriteria):
    def __init__(self, prompt_width: int, row_limits: list[int], device: torch.device,
                 on_tokens: OnTokens = no_tokens):
        self.width = prompt_width
        self.limits = torch.tensor(row_limits, device=device)
        self.sync = device.type == "cuda"
        self.times: list[float] = []
        self.on_tokens = on_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        finished = (input_ids.shape[1] - self.width) >= self.limits
        self.on_tokens(len(self.limits) - int(((input_ids.shape[1] - 1 - self.width) >= self.limits).sum()))
        return finished


class HFBackend:
    name = "hf"

    def __init__(self, cfg: BackendConfig):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model_id = model_label(cfg)
        self._export_dir = tempfile.TemporaryDirectory(prefix="rosetool-bench-")
        path = hf_folder(resolve_model(cfg), self._export_dir)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = parse_dtype(cfg.dtype) if cfg.dtype else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(path)
        self.eos = self.model.generation_config.eos_token_id
        self.pad = self._pad_id()
        self.vocab = make_vocab(self.tokenizer, self.model.config.vocab_size)
        torch.manual_seed(cfg.seed)  # sampling is reproducible when --temperature > 0

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        eos = self.eos[0] if isinstance(self.eos, list) else self.eos
        return pad if pad is not None else (eos if eos is not None else 0)

    def run(self, requests: list[Request], schedule: Schedule, on_done: OnDone,
            on_tokens: OnTokens = no_tokens) -> list[RequestResult]:
        results = [RequestResult(prompt_len=r.prompt_len) for r in requests]
        admission = Admission(schedule)
        while not admission.exhausted:
            released = admission.due(most=self.cfg.max_num_seqs)
            if not released:
                admission.wait()
                continue
            batch = [i for i, _ in released]
            for i, sent in released:
                results[i].start = sent
            try:
                self._generate([requests[i] for i in batch], [results[i] for i in batch], on_tokens)
            except (RuntimeError, ValueError) as err:
                for i in batch:
                    fail(results[i], err)
            for i in batch:
                admission.release(results[i].end)
                on_done(results[i])
        return results

    def _ids(self, request: Request) -> list[int]:
        if isinstance(request.prompt, list):
            return request.prompt
        return self.tokenizer.encode(request.prompt, add_special_tokens=False)

    def _generate(self, requests: list[Request], results: list[RequestResult], on_tokens: OnTokens) -> None:
        rows = [self._ids(r) for r in requests]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        clock = StepClock(width, [r.output_len for r in requests], self.device, on_tokens)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **self._gen_kwargs(requests, clock))
        for row, request, result in zip(out[:, width:].tolist(), requests, results):
            n = self._count(row, request.output_len)
            result.token_times, result.output_tokens = clock.times[:n], n
            result.end = clock.times[n - 1] if n else time.perf_counter()

    def _gen_kwargs(self, requests: list[Request], clock: StepClock) -> dict:
        longest = max(r.output_len for r in requests)
        kwargs = dict(max_new_tokens=longest, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=self.pad)
        if self.cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.cfg.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.cfg.ignore_eos:
            kwargs["min_new_tokens"] = longest
        if self.cfg.hf_static_cache:
            kwargs["cache_implementation"] = "static"
        return kwargs

    def _count(self, row: list[int], limit: int) -> int:
        """Tokens this row really produced: up to its limit, or through its first EOS."""
        if not self.cfg.ignore_eos and self.eos is not None:
            eos = set(self.eos) if isinstance(self.eos, list) else {self.eos}
            for k, tok in enumerate(row[:limit]):
                if tok in eos:
                    return k + 1
        return min(limit, len(row))

    def close(self) -> None:
        self._export_dir.cleanup()
