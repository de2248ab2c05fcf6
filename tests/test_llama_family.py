"""Llama, Llama 3.2 (tied, llama3 RoPE), Mistral (sliding window), Qwen2 (bias), Qwen3 (q/k norm, head_dim)."""

import json

import torch
from safetensors.torch import load_file, save_file

from conftest import hf_logits, runtime_logits
from rosetool.converters.api import convert


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_logits_match_transformers_at_several_lengths(family_hf, tmp_path):
    name, hf = family_hf
    convert(hf, tmp_path / "native", "native")
    gen = torch.Generator().manual_seed(0)
    for length in (1, 5, 19, 40):   # 19 and 40 pass Mistral's window of 6 and Llama 3's 32-token original context
        tokens = torch.randint(0, 96, (2, length), generator=gen)
        ref, got = hf_logits(hf, tokens), runtime_logits(tmp_path / "native", tokens)
        assert (ref - got).abs().max() < 1e-4, (name, length)
        assert torch.equal(ref.argmax(-1), got.argmax(-1)), (name, length)


def test_round_trip_is_bit_identical_and_export_reloads(family_hf, tmp_path):
    name, hf = family_hf
    convert(hf, tmp_path / "native", "native")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys(), name
    assert all(torch.equal(a[k], b[k]) for k in a), name
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_logits(hf, tokens), hf_logits(tmp_path / "back", tokens))
    src_cfg, out_cfg = (json.loads((p / "config.json").read_text()) for p in (hf, tmp_path / "back"))
    for key in ("model_type", "num_key_value_heads", "tie_word_embeddings", "rope_parameters"):
        assert src_cfg.get(key) == out_cfg.get(key), (name, key)
    implied = src_cfg["hidden_size"] // src_cfg["num_attention_heads"]
    assert out_cfg["head_dim"] == (src_cfg.get("head_dim") or implied)   # written explicitly, same value


def test_verify_passes_then_fails_on_one_perturbed_tensor(family_hf, tmp_path, cli):
    name, hf = family_hf
    convert(hf, tmp_path / "native", "native")
    ok = cli("verify", hf, tmp_path / "native", "--json")
    assert ok.code == 0, ok.out
    assert json.loads(ok.out)["passed"] is True
    weights = tmp_path / "native" / "model.safetensors"
    state = load_file(weights)
    state["layers.1.mlp.down.weight"][0, 0] += 0.5
    save_file(state, weights)
    bad = cli("verify", hf, tmp_path / "native")
    assert bad.code == 1 and "FAIL" in bad.out


def test_inspect_shows_family_config(family_hf, cli):
    name, hf = family_hf
    res = cli("inspect", hf, "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["format"] == "hf" and data["family"] == "llama"
    assert data["derived"]["attention"].startswith("4 heads, 2 kv heads (2 per group)")
    cfg = data["config"]
    assert cfg["tie_word_embeddings"] is (name == "llama32")
    assert cfg["qkv_bias"] is (name == "qwen2") and cfg["qk_norm"] is (name == "qwen3")
    if name == "llama32":
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    if name == "mistral":
        assert cfg["sliding_window"] == 6
    if name == "qwen3":
        assert cfg["head_dim"] == 24
    table = cli("inspect", hf)
    assert "kv heads" in table.out and "rope theta=" in table.out
