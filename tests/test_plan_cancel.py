"""Equal op chains cancel at plan time: HF -> HF moves stored bytes, never undoing and redoing ops."""

import torch
from safetensors.torch import load_file

from conftest import build_hf, hf_logits
from rosetool.converters.api import convert
from rosetool.converters.plan import make_plan
from rosetool.converters.sources import open_checkpoint


def test_hf_to_hf_plan_is_identity_copies(tmp_path):
    src = build_hf("gpt2", tmp_path / "hf", seed=3, n_layer=3, n_embd=40, n_head=5, vocab_size=77)
    plan = make_plan(open_checkpoint(src), "hf")
    writes = [w for g in plan.groups for w in g.writes]
    assert writes and all(w.chain.ops == () for w in writes)
    assert all(r.chain.ops == () for g in plan.groups for r in g.reads)
    # the native direction keeps its transposes (nothing to cancel there)
    native = make_plan(open_checkpoint(src), "native")
    assert any(w.chain.ops for g in native.groups for w in g.writes)


def test_hf_to_hf_copies_bytes_without_reading_tensors(tmp_path, monkeypatch):
    src = build_hf("gpt2", tmp_path / "hf", seed=4, n_layer=2, n_embd=24, n_head=3, vocab_size=61)
    ckpt = open_checkpoint(src)

    def no_read(key):
        raise AssertionError(f"tensor {key} was read into memory")

    monkeypatch.setattr(ckpt, "read", no_read)
    convert(ckpt, tmp_path / "out", "hf")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.tensor([[5, 9, 2, 60, 7]])
    assert torch.equal(hf_logits(src, tokens), hf_logits(tmp_path / "out", tokens))


def test_cancelled_chain_still_casts(tmp_path):
    src = build_hf("gpt2", tmp_path / "hf", seed=5, n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    convert(src, tmp_path / "half", "hf", dtype="float16")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "half" / "model.safetensors")
    assert all(after[k].dtype == torch.float16 and torch.equal(before[k].half(), after[k]) for k in before)


def test_llama_hf_to_hf_with_untied_head_round_trips(tmp_path):
    src = build_hf("llama", tmp_path / "hf", seed=6, num_attention_heads=4, num_key_value_heads=1,
                   attention_bias=True, tie_word_embeddings=False)
    convert(src, tmp_path / "out", "hf")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
