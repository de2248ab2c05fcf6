"""Column-major weights (runtime/cpu_layout.py) change strides only: same shapes, same logits, ties kept.

Checked on a tied GPT-2 (biases everywhere, odd widths) and an untied Llama with grouped-query heads, both
random-initialised by transformers; the logits of the re-laid model are compared with the HF model's own.
"""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rosetool.runtime import LLM
from rosetool.runtime.cpu_layout import make_weights_column_major
from rosetool.runtime.model import load_model


def _randomised(hf):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)   # norms and biases too, so a transposed or swapped tensor cannot hide
    return hf.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=3, vocab_size=101, n_positions=64))
    else:
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                                          num_attention_heads=6, num_key_value_heads=2, vocab_size=97,
                                          max_position_embeddings=64, tie_word_embeddings=False))
    _randomised(hf).save_pretrained(path)
    return path, hf


def _matrices(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def test_column_major_keeps_shapes_and_logits(checkpoint):
    path, hf = checkpoint
    model, _ = load_model(path, dtype=torch.float32)
    shapes = [w.shape for w in _matrices(model)]
    make_weights_column_major(model)
    assert [w.shape for w in _matrices(model)] == shapes
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in _matrices(model))
    ids = torch.tensor([[5, 17, 3, 88, 42, 9, 60, 1, 33]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_column_major_twice_is_a_no_op(checkpoint):
    model, _ = load_model(checkpoint[0], dtype=torch.float32)
    make_weights_column_major(model)
    storages = [w.data_ptr() for w in _matrices(model)]
    make_weights_column_major(model)
    assert [w.data_ptr() for w in _matrices(model)] == storages


def test_cpu_engine_runs_column_major(checkpoint):
    with LLM(checkpoint[0], dtype="float32", device="cpu", num_kv_blocks=8, block_size=4) as llm:
        assert all(w.t().is_contiguous() for w in _matrices(llm.model))
