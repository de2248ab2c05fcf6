"""Shared fixtures: tiny random models built offline with transformers, and a CLI runner."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read once, when triton is first imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["COLUMNS"] = "200"   # rich tables must not wrap the names tests look for
os.environ.setdefault("ROSETOOL_HOME", str(Path(__file__).parent / ".cache"))
logging.getLogger("transformers").setLevel(logging.ERROR)

LLAMA_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=0, eos_token_id=1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILY = {   # name -> (model_type, config overrides)
    "llama": ("llama", {}),
    "llama32": ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "mistral": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 24}),
}


def build_hf(model_type: str, folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    common = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=1) \
        if model_type == "gpt2" else LLAMA_COMMON
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**common, **overrides}))
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_hf(tmp_path_factory) -> Path:
    return build_hf("gpt2", tmp_path_factory.mktemp("gpt2") / "hf")


@pytest.fixture(scope="session", params=sorted(FAMILY))
def family_hf(request, tmp_path_factory) -> tuple[str, Path]:
    model_type, overrides = FAMILY[request.param]
    return request.param, build_hf(model_type, tmp_path_factory.mktemp(request.param) / "hf", **overrides)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `rosetool ARGS` in process, as the console script does (exit codes included)."""
    from rosetool.cli.app import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return run


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def runtime_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from rosetool.runtime.model import load_model
    model, _ = load_model(folder, torch.float32)
    with torch.no_grad():
        return model(tokens)


def tp_workers() -> list:
    """Tensor-parallel worker processes this process started and has not reaped."""
    import multiprocessing
    return [p for p in multiprocessing.active_children() if p.name.startswith("rosetool-tp-")]


def assert_a_killed_rank_ends_the_run(llm) -> None:
    """SIGKILL rank 1 of `llm` (two processes) mid-request: one line within 15 s, no worker left behind,
    and `close()` after the failure raises nothing."""
    import os
    import signal
    import time

    from rosetool.errors import RosetoolError
    from rosetool.runtime import SamplingParams

    (worker,) = llm.runner.group.workers
    llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    llm.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RosetoolError) as err:
        while llm.has_unfinished():
            llm.step()
    assert time.monotonic() - start < 15
    assert str(err.value) == "tensor-parallel rank 1 died mid-run (killed by signal 9)"
    assert not tp_workers()
    llm.close()


@pytest.fixture
def cli80(cli, monkeypatch):
    """`cli` at a terminal 80 columns wide, as a newcomer's: help, tables and messages wrap there."""
    from rosetool.cli import output
    monkeypatch.setenv("COLUMNS", "80")
    for console in (output.out, output.err):
        monkeypatch.setattr(console, "_width", 80)
    return cli
