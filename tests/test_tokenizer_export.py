"""HF exports carry a tokenizer (`--tokenizer`), checked against the embedding, or warn that they have none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_hf
from rosetool.converters.sources import TOKENIZER_FILES
from rosetool.default_model import _write_tokenizer

GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def llama_with_gpt2_tokenizer(tmp_path_factory) -> Path:
    hf = build_hf("llama", tmp_path_factory.mktemp("tok") / "hf", seed=5, vocab_size=GPT2_VOCAB, hidden_size=32,
                  intermediate_size=56, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    assert _write_tokenizer(hf)
    return hf


def _greedy_text(folder: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def test_megatron_export_with_tokenizer_generates_like_the_original(cli, llama_with_gpt2_tokenizer, tmp_path) -> None:
    hf = llama_with_gpt2_tokenizer
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "mg", "--tp", 2).code == 0
    result = cli("export-hf", tmp_path / "mg", tmp_path / "out", "--tokenizer", hf)
    assert result.code == 0, result.err
    assert "no tokenizer" not in result.err
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "generation_config.json").exists()
    text = _greedy_text(hf, "Hello world, this is")
    assert text and _greedy_text(tmp_path / "out", "Hello world, this is") == text


def test_export_without_tokenizer_warns_in_one_line(cli, llama_with_gpt2_tokenizer, tmp_path) -> None:
    assert cli("convert", "hf-to-megatron", llama_with_gpt2_tokenizer, tmp_path / "mg").code == 0
    for carried in (tmp_path / "mg").iterdir():   # as Megatron-LM writes it: weights and args, no tokenizer
        if carried.is_file() and carried.name in TOKENIZER_FILES:
            carried.unlink()
    result = cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "out")
    assert result.code == 0
    warnings = [line for line in result.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no tokenizer" in warnings[0] and "--tokenizer" in warnings[0]


def test_tokenizer_larger_than_the_embedding_is_refused_before_converting(cli, llama_with_gpt2_tokenizer,
                                                                         tmp_path) -> None:
    small = build_hf("llama", tmp_path / "small")   # 96-row embedding
    result = cli("export-hf", small, tmp_path / "out", "--tokenizer", llama_with_gpt2_tokenizer)
    assert result.code == 2 and f"{GPT2_VOCAB} tokens" in result.err and "96 rows" in result.err
    assert not (tmp_path / "out").exists()


def test_folder_without_tokenizer_files_is_refused(cli, tmp_path) -> None:
    hf = build_hf("llama", tmp_path / "hf")
    shutil.copytree(hf, tmp_path / "weights-only")
    result = cli("export-hf", hf, tmp_path / "out", "--tokenizer", tmp_path / "weights-only")
    assert result.code == 2 and "no tokenizer files" in result.err
