"""`verify` compares at the dtypes the checkpoints hold, says which and with what tolerance, and
checks both paths before loading anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf


@pytest.fixture(scope="module")
def fp32_and_bf16(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    hf = build_hf("llama", root / "hf", seed=3, hidden_size=48, intermediate_size=80, num_attention_heads=6,
                  num_key_value_heads=3)
    from rosetool.converters.api import convert
    convert(hf, root / "bf16", "hf", dtype="bfloat16")
    return hf, root / "bf16"


def test_bf16_export_of_fp32_model_passes_without_flags(cli, fp32_and_bf16) -> None:
    hf, bf16 = fp32_and_bf16
    result = cli("verify", hf, bf16, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert (doc["dtype_a"], doc["dtype_b"], doc["dtype"]) == ("float32", "bfloat16", "bfloat16")
    assert doc["passed"] and 0 < doc["max_abs_diff"] <= doc["tolerance"]
    assert doc["tolerance"] > 1e-2   # the bf16 tolerance, not fp32's 1e-4


def test_table_names_dtypes_and_tolerance(cli, fp32_and_bf16) -> None:
    result = cli("verify", *fp32_and_bf16)
    assert result.code == 0
    assert "float32" in result.out and "bfloat16" in result.out and "tolerance" in result.out
    assert "PASS" in result.out


def test_forcing_fp32_tolerance_on_a_bf16_export_fails(cli, fp32_and_bf16) -> None:
    assert cli("verify", *fp32_and_bf16, "--dtype", "float32").code == 1


def test_a_perturbed_tensor_fails(cli, fp32_and_bf16, tmp_path: Path) -> None:
    _, bf16 = fp32_and_bf16
    bad = tmp_path / "bad"
    shutil.copytree(bf16, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key] + 0.5 * torch.randn_like(tensors[key].float()).to(tensors[key].dtype)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    result = cli("verify", fp32_and_bf16[0], bad)
    assert result.code == 1 and "FAIL" in result.out


def test_both_paths_are_checked_before_loading(cli, fp32_and_bf16, tmp_path: Path, monkeypatch) -> None:
    import rosetool.verify as verify_mod

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the second path")
    monkeypatch.setattr(verify_mod, "load_forward", no_load)
    result = cli("verify", fp32_and_bf16[0], tmp_path / "missing")
    assert result.code == 2 and "missing" in result.err and "Traceback" not in result.err


def test_vocabularies_differ_only_by_megatron_padding(cli, fp32_and_bf16, tmp_path) -> None:
    """A Megatron checkpoint that records no HF vocabulary size (as Megatron-LM writes them) keeps its padded
    rows; verify compares the real ones. Two HF folders of different vocabularies are refused."""
    hf, _ = fp32_and_bf16
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "mg").code == 0
    rank = tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    blob = torch.load(rank, weights_only=False)
    del vars(blob["args"])["rosetool_config"]
    torch.save(blob, rank)
    result = cli("verify", tmp_path / "mg", hf, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["passed"] and doc["vocab"] == 96 and doc["max_abs_diff"] <= 1e-4
    other = build_hf("llama", tmp_path / "other", vocab_size=128)
    result = cli("verify", other, hf)
    assert result.code == 2 and f"vocabulary sizes differ: {other} has 128, {hf} has 96" in result.err
