"""Cheap checks that run before anything heavy: conversion directions, hub ids, tokenizers for `generate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import build_hf


@pytest.fixture(scope="module")
def hf_and_native(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dirs")
    hf = build_hf("llama", root / "hf")
    from rosetool.converters.api import convert
    convert(hf, root / "native", "native")
    return hf, root / "native"


def test_native_to_hf_on_an_hf_folder_says_it_is_already_hf(cli, hf_and_native, tmp_path) -> None:
    result = cli("convert", "native-to-hf", hf_and_native[0], tmp_path / "out")
    assert result.code == 2 and "already a hf checkpoint" in result.err and "export-hf" in result.err
    assert not (tmp_path / "out").exists()


def test_hf_to_native_on_a_native_folder_is_refused(cli, hf_and_native, tmp_path) -> None:
    result = cli("convert", "hf-to-native", hf_and_native[1], tmp_path / "out")
    assert result.code == 2 and "already a native checkpoint" in result.err


def test_hf_to_megatron_on_a_megatron_folder_points_to_reshard(cli, hf_and_native, tmp_path) -> None:
    assert cli("convert", "hf-to-megatron", hf_and_native[0], tmp_path / "mg").code == 0
    result = cli("convert", "hf-to-megatron", tmp_path / "mg", tmp_path / "again")
    assert result.code == 2 and "rosetool reshard" in result.err


def test_unknown_hub_id_suggests_hf_download(cli, tmp_path) -> None:
    result = cli("inspect", "nobody-here/no-such-model")
    assert result.code == 2 and "hf download nobody-here/no-such-model" in result.err
    assert "huggingface-cli" not in result.err


def test_generate_without_tokenizer_refuses_a_text_prompt_before_loading(cli, hf_and_native, monkeypatch) -> None:
    import rosetool.runtime as runtime

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompt was checked")
    monkeypatch.setattr(runtime, "LLM", no_load)
    result = cli("generate", hf_and_native[1], "hello there")
    assert result.code == 2 and "no tokenizer" in result.err


def test_generate_without_tokenizer_takes_token_ids(cli, hf_and_native) -> None:
    result = cli("generate", hf_and_native[1], "3 4 5", "--max-tokens", "3", "--temperature", "0")
    assert result.code == 0, result.err
    assert len(result.out.split()) == 3


def test_inspect_megatron_shows_rank_layout_and_params_without_padding(cli, tmp_path) -> None:
    hf = build_hf("llama", tmp_path / "hf", vocab_size=101)   # odd: padded to 256 for TP 2
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", 2, "--pp", 2).code == 0
    from transformers import AutoModelForCausalLM
    want = AutoModelForCausalLM.from_pretrained(hf).num_parameters()
    doc = json.loads(cli("inspect", tmp_path / "mg", "--json").out)
    assert doc["parameters_without_vocab_padding"] == want
    assert doc["parameters"] - want == (256 - 101) * 64 * 2   # embedding and output layer rows
    ranks = {(r["tp"], r["pp"]) for r in doc["ranks"]}
    assert ranks == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert all(r["bytes"] == (tmp_path / "mg" / r["file"]).stat().st_size for r in doc["ranks"])
    text = cli("inspect", tmp_path / "mg").out
    assert "rank layout: TP=2 x PP=2, 4 files" in text and "without" in text and "vocabulary padding" in text
    assert "mp_rank_01_001" in text and "{'" not in text   # a table, not a dict dump


def test_inspect_hf_has_no_padding(cli, hf_and_native) -> None:
    doc = json.loads(cli("inspect", hf_and_native[0], "--json").out)
    assert doc["parameters"] == doc["parameters_without_vocab_padding"] and doc["ranks"] == []
    assert doc["parameters"] == sum(math.prod(t["shape"]) for t in doc["tensors"])


def test_inspect_torch_dist_lists_its_files(cli, tmp_path) -> None:
    hf = build_hf("llama", tmp_path / "hf")
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "mg", "--format", "torch_dist", "--tp", 2).code == 0
    doc = json.loads(cli("inspect", tmp_path / "mg", "--json").out)
    files = {Path(r["file"]).name for r in doc["ranks"]}
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    assert "TP=2 x PP=1" in cli("inspect", tmp_path / "mg").out
