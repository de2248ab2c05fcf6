"""Checks every family's tests run on a converted tiny model: the commands users run on it (verify, export-hf,
bench, inspect) and paged greedy generation against HF `generate`. Shared by tests/test_families.py and
tests/test_deepseek.py, which differ in how they build models, not in what a family must pass."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosetool.runtime import LLM, SamplingParams


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def check_paged_greedy_equals_hf_generate(name: str, hf, native: Path, vocab: int) -> None:
    """Three prompts of different lengths through small blocks and chunked prefill, 12 greedy tokens each."""
    prompts = [[random.Random(i).randrange(2, vocab) for _ in range(n)] for i, n in enumerate([3, 11, 26])]
    llm = LLM(native, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        assert out.token_ids == ref[0, len(prompt):].tolist(), (name, len(prompt))
    assert len({t for out in outs for t in out.token_ids}) > 3, "greedy output too uniform to catch a cache bug"


def check_verify_and_export(name: str, cli, hf: Path, native: Path, tmp_path: Path) -> None:
    res = cli("verify", hf, native, "--json")
    assert res.code == 0 and json.loads(res.out)["passed"] is True, (name, res.out, res.err)
    assert cli("export-hf", native, tmp_path / "export").code == 0
    assert tensors(tmp_path / "export").keys() == tensors(hf).keys(), name


def check_bench_offline(name: str, cli, native: Path) -> None:
    res = cli("bench", "offline", "--backend", "rosetool", "--model", native, "--num-prompts", "2", "--input-len", "6",
              "--output-len", "3", "--warmup", "0", "--runs", "1", "--json")
    assert res.code == 0, (name, res.err)
    assert json.loads(res.out)["runs"], name


def check_inspect(name: str, cli, hf: Path, native: Path, facts: list[str]) -> None:
    """Each fact in the table (cells may wrap) for both formats, and the same derived facts from both."""
    for path in (hf, native):
        res = cli("inspect", path)
        assert res.code == 0, res.err
        text = " ".join(res.out.replace("│", " ").split())
        for fact in facts:
            assert fact in text, (name, fact)
    derived = [json.loads(cli("inspect", p, "--json").out)["derived"] for p in (hf, native)]
    assert derived[0] == derived[1], name   # the same facts whichever format the model is in


def convert_case(request, tmp_path_factory, cases: dict, build) -> tuple[str, Path, Path, list[str]]:
    """A module fixture's case: the tiny HF model `build` makes from `cases[name]`, and its native conversion."""
    from rosetool.converters.api import convert
    model_type, config, facts = cases[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf = build(model_type, config, root / "hf")
    convert(hf, root / "native", "native")
    return request.param, hf, root / "native", facts


def check_logits_at_lengths(name: str, hf_logits, native: Path, vocab: int) -> None:
    """Within 1e-4 of transformers (fp32) and the same argmax, at 1, 6, 23 and 50 tokens (past every window)."""
    from rosetool.runtime.model import load_model
    model, _ = load_model(native, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for length in (1, 6, 23, 50):
        tokens = torch.randint(0, vocab, (2, length), generator=gen)
        with torch.no_grad():
            ref, got = hf_logits(tokens), model(tokens)
        assert (ref - got).abs().max() < 1e-4, (name, length)
        assert torch.equal(ref.argmax(-1), got.argmax(-1)), (name, length)
