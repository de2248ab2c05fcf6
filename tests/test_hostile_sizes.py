"""Sizes a config claims are checked against what the files hold before anything is built from them.

Each case runs the CLI in a child process with its address space capped, so that a regression fails
with a MemoryError (exit 1) instead of taking the machine with it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import build_hf
from moe_models import build_moe_hf

LIMIT = 4 << 30   # torch's import alone maps ~1.5 GB of address space


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def run_capped(*argv: object, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", "from rosetool.cli.app import main; main()", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=_cap)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (proc.returncode, proc.stderr)
    return lines[0]


def edit(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sizes")
    from rosetool.converters import api
    out = {"llama": build_hf("llama", root / "llama"), "mixtral": build_moe_hf("mixtral", root / "mixtral"),
           "qwen3_moe": build_moe_hf("qwen3_moe", root / "qwen3_moe")}
    api.convert(out["llama"], root / "native", "native")
    api.convert(out["mixtral"], root / "native_moe", "native")
    out.update(native=root / "native", native_moe=root / "native_moe")
    return out


def copy_of(models: dict[str, Path], name: str, tmp_path: Path) -> Path:
    import shutil
    shutil.copytree(models[name], tmp_path / name)
    return tmp_path / name


BIG = 10**9


@pytest.mark.parametrize("name,key,fragment", [
    ("llama", "num_hidden_layers", "num_layers=1000000000, but the checkpoint holds only"),
    ("mixtral", "num_local_experts", "num_experts=1000000000, but tensor"),
    # decoder_sparse_step makes the config codec list every dense layer: bounded before it runs
    ("qwen3_moe", "num_hidden_layers", "num_layers=1000000000"),
])
def test_hf_config_counts_beyond_the_files(models, tmp_path, name, key, fragment):
    src = copy_of(models, name, tmp_path)
    edit(src / "config.json", lambda c: c.update({key: BIG}))
    line = one_line(run_capped("convert", "hf-to-native", src, tmp_path / "dst"))
    assert str(src / "config.json") in line or str(src) in line
    assert fragment in line, line
    assert not (tmp_path / "dst").exists()


def test_expert_count_just_above_the_files(models, tmp_path):
    """Not absurd, just wrong: the last expert's tensor is named."""
    src = copy_of(models, "mixtral", tmp_path)
    edit(src / "config.json", lambda c: c.update(num_local_experts=6))
    line = one_line(run_capped("convert", "hf-to-native", src, tmp_path / "dst"))
    assert "num_experts=6" in line and "experts.5.w1.weight" in line


def test_stacked_experts_bounded_by_their_tensor(models, tmp_path):
    """native stores experts stacked [E, ...]: a count beyond that dim is refused by the tensor's name."""
    src = copy_of(models, "native_moe", tmp_path)
    edit(src / "config.json", lambda c: c["config"].update(num_experts=BIG))
    line = one_line(run_capped("convert", "native-to-hf", src, tmp_path / "dst"))
    assert "num_experts=1000000000" in line and "moe.experts.up.weight" in line and "that stacks them" in line


@pytest.mark.parametrize("command", [("generate",), ("convert", "native-to-hf")])
def test_native_layer_count_beyond_the_files(models, tmp_path, command):
    src = copy_of(models, "native", tmp_path)
    edit(src / "config.json", lambda c: c["config"].update(num_layers=BIG))
    argv = (*command, src, "1 2 3", "--device", "cpu") if command == ("generate",) else (*command, src, tmp_path / "d")
    line = one_line(run_capped(*argv))
    assert "num_layers=1000000000" in line


def test_megatron_args_layer_and_tp_counts(models, tmp_path):
    from rosetool.converters import api
    from rosetool.converters.megatron.unpickler import load_rank_file
    mg = tmp_path / "mg"
    api.convert(models["llama"], mg, "megatron")
    path = mg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    original = path.read_bytes()
    for field, value, fragment in [("num_layers", BIG, "num_layers=1000000000"),
                                   ("tensor_model_parallel_size", BIG, "missing rank file")]:
        blob = load_rank_file(path)
        setattr(blob["args"], field, value)
        torch.save(blob, path.with_suffix(".new"))   # not over the file the blob is mapped from
        path.with_suffix(".new").replace(path)
        line = one_line(run_capped("convert", "megatron-to-hf", mg, tmp_path / "out"))
        assert fragment in line, line
        path.write_bytes(original)


def test_cuda_kv_pool_is_sized_by_free_memory_not_the_config():
    """max_position_embeddings=10^12 on CUDA: the pool is what fits (max_model_len lowered), not one
    full context of 10^12 tokens."""
    from types import SimpleNamespace
    from rosetool.runtime.model_runner import ModelRunner
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.block_size, runner.dtype = torch.device("cuda"), 16, torch.float16
    runner.config = SimpleNamespace(max_model_len=None, max_num_seqs=4)
    runner.args = SimpleNamespace(max_position_embeddings=10**12, num_layers=2, is_mla=False, num_kv_heads=2,
                                  head_dim=16)
    runner._cuda_free_blocks = lambda: 1000
    assert runner._default_num_blocks() == 1000
    runner._cuda_free_blocks = lambda: 0
    from rosetool.errors import RosetoolError
    with pytest.raises(RosetoolError, match="not enough free GPU memory"):
        runner._default_num_blocks()
