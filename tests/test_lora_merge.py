"""LoRA merges (`--adapter`) against peft's merge_and_unload: runtime load, conversions, Megatron sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf
from lora_models import ATTENTION, GPT2_TARGETS, LLAMA_TARGETS, load_hf, logits, make_adapter, peft_merged
from moe_models import build_moe_hf

# name -> (base builder, LoraConfig kwargs); ranks, rsLoRA and modules_to_save vary across them
CASES = {
    "llama_r4": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"])),
    "llama_rslora": ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS,
                                   rank_pattern={"gate_proj": 2, "layers.1.self_attn.q_proj": 6},
                                   alpha_pattern={"down_proj": 3})),
    "qwen3_moe_attn": ("qwen3_moe", dict(r=2, lora_alpha=5, target_modules=ATTENTION, use_rslora=True)),
    "gpt2": ("gpt2", dict(r=3, lora_alpha=6, target_modules=GPT2_TARGETS, fan_in_fan_out=True,
                          modules_to_save=["ln_f"])),
}


def build_base(kind: str, folder: Path) -> Path:
    return build_moe_hf("qwen3_moe", folder) if kind == "qwen3_moe" else build_hf(kind, folder)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, lora = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = build_base(kind, root / "base")
    adapter = make_adapter(base, root / "adapter", **lora)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(3))
    return request.param, base, adapter, tokens, logits(peft_merged(base, adapter), tokens)


def test_runtime_merge_equals_peft(case):
    from rosetool.runtime.loader import load_model
    name, base, adapter, tokens, ref = case
    model, _ = load_model(base, torch.float32, adapters=[adapter])
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=0, msg=name)


def test_export_hf_with_adapter_equals_peft(case, cli, tmp_path):
    name, base, adapter, tokens, ref = case
    assert cli("export-hf", base, tmp_path / "merged", "--adapter", adapter).code == 0
    torch.testing.assert_close(logits(load_hf(tmp_path / "merged"), tokens), ref, atol=1e-5, rtol=0, msg=name)


def test_native_merge_through_cli_and_verify(case, cli, tmp_path):
    """HF base + adapter -> native (merged while streaming) runs with peft's logits; verify agrees."""
    from rosetool.runtime.loader import load_model
    name, base, adapter, tokens, ref = case
    assert cli("convert", "hf-to-native", base, tmp_path / "native", "--adapter", adapter).code == 0
    model, _ = load_model(tmp_path / "native", torch.float32)
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=0, msg=name)
    result = cli("verify", base, tmp_path / "native", "--adapter", adapter, "--json")
    assert result.code == 0 and json.loads(result.out)["runner_a"] == "rosetool+lora"


def test_two_adapters_apply_in_order(tmp_path):
    from rosetool.runtime.loader import load_model
    base = build_hf("llama", tmp_path / "base")
    first = make_adapter(base, tmp_path / "a1", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                         modules_to_save=["lm_head"])
    second = make_adapter(base, tmp_path / "a2", seed=2, r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                          modules_to_save=["lm_head"])
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = logits(peft_merged(base, first, second), tokens)
    model, _ = load_model(base, torch.float32, adapters=[first, second])
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=0)
    swapped, _ = load_model(base, torch.float32, adapters=[second, first])   # the later lm_head wins
    assert not torch.allclose(logits(swapped, tokens), ref, atol=1e-3)


def test_megatron_base_with_peft_adapter(tmp_path, cli):
    """An HF adapter merged into a TP=2, PP=2 Megatron copy of its base: the canonical path."""
    from rosetool.runtime.loader import load_model
    base = build_hf("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    assert cli("convert", "hf-to-megatron", base, tmp_path / "mcore", "--tp", "2", "--pp", "2").code == 0
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(tmp_path / "mcore", torch.float32, adapters=[adapter])
    torch.testing.assert_close(logits(model, tokens)[..., :96], logits(peft_merged(base, adapter), tokens),
                               atol=1e-5, rtol=0)


def test_bf16_merge_is_cast_once(tmp_path):
    """W + delta in fp32 then one cast: the merged bf16 tensor is peft's fp32 merge rounded once."""
    from rosetool.adapters.merge import with_adapters
    from rosetool.converters.sources import open_checkpoint
    base = build_hf("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    merged = with_adapters(open_checkpoint(base), [adapter], torch.bfloat16)
    got = merged.read("model.layers.0.self_attn.q_proj.weight")
    ref = peft_merged(base, adapter).model.layers[0].self_attn.q_proj.weight.detach()
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref.to(torch.bfloat16))


# --- bad adapters: one line naming file and tensor, exit 2 ----------------------------------------


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = build_hf("llama", root / "base")
    return root, base, make_adapter(base, root / "good", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)


def _copy_adapter(good: Path, dst: Path, config=None, rename=None) -> Path:
    dst.mkdir()
    cfg = json.loads((good / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(good / "adapter_model.safetensors")
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _refused(cli, base: Path, adapter: Path, dst: Path, *words: str) -> str:
    result = cli("convert", "hf-to-native", base, dst, "--adapter", adapter)
    line = result.err.strip()
    assert result.code == 2 and len(line.splitlines()) == 1 and "Traceback" not in result.err, result.err
    for w in words:
        assert w in line, line
    assert not dst.exists()
    return line


def test_rank_mismatch_is_one_line(llama_pair, cli, tmp_path):
    root, base, good = llama_pair
    bad = _copy_adapter(good, tmp_path / "rank", config={"r": 8})
    _refused(cli, base, bad, tmp_path / "out", "rank mismatch", "adapter_model.safetensors", "lora_A.weight", "r=8")


def test_target_the_base_lacks_is_one_line(llama_pair, cli, tmp_path):
    root, base, good = llama_pair
    bad = _copy_adapter(good, tmp_path / "missing", rename=("layers.1.", "layers.5."))
    _refused(cli, base, bad, tmp_path / "out", "model.layers.5.", "does not have", "adapter_model.safetensors")


def test_base_of_another_shape_is_one_line(llama_pair, cli, tmp_path):
    root, base, good = llama_pair
    other = build_hf("llama", tmp_path / "other", intermediate_size=96)
    _refused(cli, other, good, tmp_path / "out", "another shape", "mlp.down_proj.lora_B.weight", "[64, 112]", "[64, 96]")


def test_dora_is_refused_by_name(llama_pair, cli, tmp_path):
    root, base, good = llama_pair
    bad = _copy_adapter(good, tmp_path / "dora", config={"use_dora": True})
    _refused(cli, base, bad, tmp_path / "out", "DoRA", "adapter_config.json")


def test_not_an_adapter_is_one_line(llama_pair, cli, tmp_path):
    root, base, good = llama_pair
    _refused(cli, base, base, tmp_path / "out", "not a LoRA adapter")
