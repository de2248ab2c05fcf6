"""Inconsistent or unsafe Megatron checkpoints: one line naming the rank file and tensor, exit code 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import megatron_ref as ref
import pytest
import torch

from rosetool.cli.app import main
from rosetool.converters.megatron.unpickler import load_rank_file


def run(*argv: object) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


@pytest.fixture()
def tp2(tmp_path: Path) -> Path:
    ref.tiny_hf("llama", tmp_path / "hf")
    assert run("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2) == 0
    return tmp_path / "mg"


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_rank_file(tp2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tp2 / "release" / "mp_rank_01")
    capsys.readouterr()
    assert run("convert", "megatron-to-hf", tp2, tmp_path / "out") == 2
    line = error_line(capsys)
    assert "mp_rank_01/model_optim_rng.pt: missing rank file" in line and "TP=2" in line


def test_shard_that_does_not_fit_tp(tp2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tp2 / "release" / "mp_rank_01" / "model_optim_rng.pt"
    blob = load_rank_file(path)
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    blob["model"][key] = torch.zeros(64, 64)    # a TP=1-sized shard in a TP=2 checkpoint
    torch.save(blob, path.with_suffix(".new"))
    path.with_suffix(".new").replace(path)
    capsys.readouterr()
    assert run("convert", "megatron-to-hf", tp2, tmp_path / "out") == 2
    line = error_line(capsys)
    assert "mp_rank_01/model_optim_rng.pt" in line and key in line and "[64, 64]" in line and "TP=2" in line


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_pickle_is_refused(tp2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tp2 / "release" / "mp_rank_00" / "model_optim_rng.pt"
    blob = load_rank_file(path)
    blob["optimizer"] = Boom()
    torch.save(blob, path.with_suffix(".new"))
    path.with_suffix(".new").replace(path)
    capsys.readouterr()
    assert run("inspect", tp2) == 2
    line = error_line(capsys)
    assert "mp_rank_00/model_optim_rng.pt: refused an unsafe pickle" in line and "system" in line
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("flags,message", [(("--tp", 4), "2 query groups cannot be split over TP=4"),
                                           (("--pp", 3), "2 layers cannot be split evenly over PP=3")])
def test_layouts_the_model_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message) -> None:
    ref.tiny_hf("llama", tmp_path / "hf")
    capsys.readouterr()
    assert run("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", *flags) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "mg").exists()


def test_strict_refuses_nan_weights_on_every_megatron_command(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Without --strict a NaN weight is a warning naming the tensor; with it, exit 2 and no output."""
    from safetensors.torch import load_file, save_file
    ref.tiny_hf("llama", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert run("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "refused", "--strict") == 2
    assert key in error_line(capsys) and not (tmp_path / "refused").exists()
    assert run("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2) == 0
    assert key in capsys.readouterr().err
    megatron_key = "decoder.layers.1.mlp.linear_fc1.weight"
    for argv in (["convert", "megatron-to-hf", tmp_path / "mg"], ["reshard", tmp_path / "mg"]):
        assert run(*argv, tmp_path / "out", "--strict") == 2
        assert megatron_key in error_line(capsys) and not (tmp_path / "out").exists()
        assert run(*argv, tmp_path / "out") == 0
        assert megatron_key in capsys.readouterr().err
        shutil.rmtree(tmp_path / "out")
