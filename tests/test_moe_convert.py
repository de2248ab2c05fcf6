"""MoE conversions: every architecture round-trips bit-identically, and the fused native expert tensors
hold each expert's own weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_models import MOE_CASES, build_moe_hf
from rosetool.converters.api import convert


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=sorted(MOE_CASES))
def moe_hf(request, tmp_path_factory):
    return request.param, build_moe_hf(request.param, tmp_path_factory.mktemp(request.param) / "hf")


def _expert_key(name: str, layer: int, e: int, proj: str) -> str:
    if name == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"


def test_hf_native_hf_is_bit_identical(moe_hf, tmp_path):
    name, hf = moe_hf
    convert(hf, tmp_path / "native", "native")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    src, back = tensors(hf), tensors(tmp_path / "back")
    assert sorted(src) == sorted(back)
    for k in src:
        assert torch.equal(src[k], back[k]), k
    from transformers import AutoConfig
    a, b = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(tmp_path / "back")
    assert a.architectures == b.architectures
    for field in ("num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size", "intermediate_size",
                  "shared_expert_intermediate_size", "num_experts", "num_local_experts"):
        assert getattr(a, field, None) == getattr(b, field, None), field
    head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert head_dim(a) == head_dim(b)   # written explicitly where the source left it implied
    assert _dense_layers(a) == _dense_layers(b)   # decoder_sparse_step folds into mlp_only_layers


def _dense_layers(cfg) -> list[int]:
    step, listed = getattr(cfg, "decoder_sparse_step", 1), getattr(cfg, "mlp_only_layers", [])
    return [i for i in range(cfg.num_hidden_layers) if i in listed or (i + 1) % step]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])   # byte copy, and the expert-by-expert write path
def test_native_experts_are_stacked_each_from_its_own_source(moe_hf, tmp_path, dtype):
    name, hf = moe_hf
    convert(hf, tmp_path / "native", "native", dtype=dtype)
    src, native = tensors(hf), tensors(tmp_path / "native")
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())["config"]
    moe_layers = [i for i in range(cfg["num_layers"]) if i not in cfg["mlp_only_layers"]]
    assert moe_layers and (name not in ("qwen2_moe", "qwen3_moe") or len(moe_layers) < cfg["num_layers"])
    cast = (lambda t: t.to(torch.bfloat16)) if dtype else (lambda t: t)
    for i in range(cfg["num_layers"]):
        assert (f"layers.{i}.moe.experts.up.weight" in native) == (i in moe_layers)
        assert (f"layers.{i}.mlp.up.weight" in native) == (i not in moe_layers)
    for i in moe_layers:
        up, down = native[f"layers.{i}.moe.experts.up.weight"], native[f"layers.{i}.moe.experts.down.weight"]
        assert up.shape[0] == down.shape[0] == cfg["num_experts"]
        for e in range(cfg["num_experts"]):
            gate_up = torch.cat([src[_expert_key(name, i, e, "gate")], src[_expert_key(name, i, e, "up")]])
            assert torch.equal(up[e], cast(gate_up)), (i, e)
            assert torch.equal(down[e], cast(src[_expert_key(name, i, e, "down")])), (i, e)


def test_shared_expert_fused_as_gate_then_up(tmp_path):
    hf = build_moe_hf("qwen2_moe", tmp_path / "hf", seed=3)
    convert(hf, tmp_path / "native", "native")
    src, native = tensors(hf), tensors(tmp_path / "native")
    p = "model.layers.0.mlp.shared_expert"
    assert torch.equal(native["layers.0.moe.shared.up.weight"], torch.cat([src[f"{p}.gate_proj.weight"], src[f"{p}.up_proj.weight"]]))
    assert torch.equal(native["layers.0.moe.shared_gate.weight"], src["model.layers.0.mlp.shared_expert_gate.weight"])
    assert "layers.1.moe.router.weight" not in native   # mlp_only_layers=[1]


def test_refused_config_is_named(tmp_path):
    hf = build_moe_hf("olmoe", tmp_path / "hf", clip_qkv=2.0)
    with pytest.raises(Exception, match="clip_qkv"):
        convert(hf, tmp_path / "out", "native")


def test_verify_passes_against_transformers(moe_hf, tmp_path, cli):
    name, hf = moe_hf
    convert(hf, tmp_path / "native", "native")
    result = cli("verify", hf, tmp_path / "native")
    assert result.code == 0 and "PASS" in result.out, result.out + result.err
    result = cli("inspect", hf)
    assert result.code == 0 and "experts, top-" in result.out and "unmapped config" not in result.out


def test_fused_source_is_read_once_when_restacked_with_a_cast(tmp_path):
    """native -> native in bf16: each fused expert tensor feeds E expert-by-expert writes but is read once."""
    from rosetool.converters.sources import open_checkpoint
    convert(build_moe_hf("mixtral", tmp_path / "hf", seed=5), tmp_path / "native", "native")
    ckpt = open_checkpoint(tmp_path / "native")
    reads, read = [], ckpt.read
    ckpt.read = lambda key: reads.append(key) or read(key)
    convert(ckpt, tmp_path / "bf16", "native", dtype="bfloat16")
    src, out = tensors(tmp_path / "native"), tensors(tmp_path / "bf16")
    assert sorted(reads) == sorted(src)
    for k in src:
        assert torch.equal(out[k], src[k].to(torch.bfloat16)), k
