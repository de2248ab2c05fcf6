"""Quantized checkpoints through every path, each against a reference nobody here wrote or against the
published formula: DeepSeek-V3 with partial edge blocks, Qwen3 with whole blocks (which transformers itself
loads on CPU), a Qwen3-MoE's experts, INT4 groups; FP8 written for vLLM; bad inputs refused by name."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import build_hf
from family_checks import tensors
from moe_models import build_moe_hf
from quant_models import quantize_folder
from rosetool.runtime import LLM, SamplingParams
from test_deepseek import build as build_deepseek
from test_deepseek_megatron import MG


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), k


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """DeepSeek-V3 with q LoRA, in blocks of 16 x 16: kv_a (24 rows), q_a (21), hidden 45 are all partial."""
    root = tmp_path_factory.mktemp("dsq")
    hf = build_deepseek("deepseek_v3", {**MG, "q_lora_rank": 21, "n_group": 4, "topk_group": 2,
                                        "num_experts_per_tok": 4}, root / "hf")
    return hf, root / "fp8", quantize_folder(hf, root / "fp8", block=(16, 16))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3 in whole blocks of 32, which transformers' own CPU dequantization accepts."""
    root = tmp_path_factory.mktemp("q3q")
    hf = build_hf("qwen3", root / "hf", hidden_size=128, intermediate_size=256, head_dim=32, num_key_value_heads=4)
    return hf, root / "fp8", quantize_folder(hf, root / "fp8", block=(32, 32))


def test_every_dequantizing_path_gives_the_formula_bit_for_bit(deepseek, cli, tmp_path):
    hf, fp8, expect = deepseek
    assert cli("export-hf", fp8, tmp_path / "bf16", "--dtype", "bfloat16").code == 0
    out = tmp_path / "bf16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _same_bits(tensors(out), expect)          # no scale tensor left, every weight exact
    assert cli("convert", "hf-to-native", fp8, tmp_path / "native").code == 0
    assert cli("convert", "native-to-hf", tmp_path / "native", tmp_path / "back").code == 0
    _same_bits(tensors(tmp_path / "back"), expect)
    assert cli("convert", "hf-to-megatron", fp8, tmp_path / "meg", "--tp", "3", "--ep", "2").code == 0
    assert cli("convert", "megatron-to-hf", tmp_path / "meg", tmp_path / "meg-hf").code == 0
    _same_bits(tensors(tmp_path / "meg-hf"), expect)


def test_hf_to_hf_keeps_the_stored_bytes_and_config(deepseek, cli, tmp_path):
    hf, fp8, _ = deepseek
    assert cli("export-hf", fp8, tmp_path / "out", "--max-shard-size", "20KB").code == 0
    out = tmp_path / "out"
    assert len(list(out.glob("*.safetensors"))) > 2          # re-sharded
    _same_bits(tensors(out), load_file(fp8 / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]


def test_transformers_dequantizes_the_same_weights_and_generates_the_same_tokens(qwen3, tmp_path):
    _, fp8, expect = qwen3
    ref = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.bfloat16).eval()   # CPU: dequantized on load
    state = ref.state_dict()
    for k, v in expect.items():
        assert torch.equal(_bits(state[k]), _bits(v)), k
    llm = LLM(fp8, dtype="bfloat16", device="cpu", block_size=4)
    prompts = [[random.Random(i).randrange(2, 96) for _ in range(n)] for i, n in enumerate([3, 9])]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, got in zip(prompts, outs):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert got.token_ids == want[0, len(prompt):].tolist()


def _quantizer(scale_fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Cfg:
        weight_block_size = [128, 128]

    cfg = Cfg()
    cfg.scale_fmt = scale_fmt
    return Fp8Quantize(type("Q", (), {"quantization_config": cfg})())


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_export_equals_the_reference_quantizer_and_loads_in_transformers(qwen3, cli, tmp_path, scale_fmt):
    hf = qwen3[0]
    args = ["--scale-fmt", scale_fmt] if scale_fmt else []
    assert cli("export-hf", hf, tmp_path / "q", "--quantize", "fp8", *args).code == 0
    got, base = tensors(tmp_path / "q"), load_file(hf / "model.safetensors")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128] and cfg.get("scale_fmt") == scale_fmt
    quantized = [k for k in got if k.endswith("weight_scale_inv")]
    assert len(quantized) == 2 * 7                            # q k v o gate up down, two layers
    for k in quantized:
        w = k.removesuffix("_scale_inv")
        ref = _quantizer(scale_fmt)._quantize_one(w, base[w])
        assert torch.equal(_bits(got[w]), _bits(ref[w])) and torch.equal(got[k].float(), ref[k].float()), w
    for kept in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(got[kept], base[kept])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    bf16 = AutoModelForCausalLM.from_pretrained(hf).eval()
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(tokens).logits, bf16(tokens).logits, dim=-1)
    assert cos.min() > 0.99
    again = tmp_path / "again"
    assert cli("export-hf", hf, again, "--quantize", "fp8", *args).code == 0   # deterministic
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "q" / "model.safetensors").read_bytes()


def test_fp8_channel_export_reads_back_through_compressed_tensors(qwen3, cli, tmp_path):
    hf = qwen3[0]
    assert cli("export-hf", hf, tmp_path / "q", "--quantize", "fp8-channel",
               "--quantize-ignore", "model.layers.1.self_attn.*").code == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "float-quantized" and "model.layers.1.self_attn.q_proj" in cfg["ignore"]
    stored = tensors(tmp_path / "q")
    assert stored["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float32       # ignored: kept
    assert stored["model.layers.0.self_attn.q_proj.weight_scale"].shape == (128, 1)
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()   # through compressed-tensors
    state, ours = model.state_dict(), tensors_of(tmp_path / "q")
    args = QuantizationArgs(**cfg["config_groups"]["group_0"]["weights"])
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        ref = dequantize(state[k], state[k + "_scale"], None, args, dtype=torch.bfloat16)
        assert torch.equal(_bits(ref), _bits(ours[k])), k
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(tokens).logits.float(),
                                                    AutoModelForCausalLM.from_pretrained(hf)(tokens).logits, dim=-1)
    assert cos.min() > 0.99


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """The logical tensors rosetool decodes from a folder."""
    from rosetool.converters.sources import open_checkpoint
    ckpt = open_checkpoint(folder)
    return {k: ckpt.read(k) for k in ckpt.tensors}


def test_serve_tp_refuses_a_split_that_breaks_blocks(qwen3, cli, tmp_path):
    hf = qwen3[0]
    res = cli("export-hf", hf, tmp_path / "q", "--quantize", "fp8", "--serve-tp", "2")
    assert res.code == 2 and "q_proj.weight" in res.err and "64 rows per rank" in res.err
    assert not (tmp_path / "q").exists()
    assert cli("export-hf", hf, tmp_path / "ok", "--quantize", "fp8", "--serve-tp", "1").code == 0


def test_moe_experts_dequantize_exactly_and_run(cli, tmp_path):
    hf = build_moe_hf("qwen3_moe", tmp_path / "hf")
    expect = quantize_folder(hf, tmp_path / "fp8", block=(8, 8), scale_name="scale")   # newer hubs' `.scale`
    assert any(".experts.3.down_proj" in k for k in expect)
    assert cli("export-hf", tmp_path / "fp8", tmp_path / "bf16", "--dtype", "bfloat16").code == 0
    _same_bits(tensors(tmp_path / "bf16"), expect)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got, want = (LLM(p, dtype="bfloat16", device="cpu").generate([[5, 6, 7]], params)[0].token_ids
                 for p in (tmp_path / "fp8", tmp_path / "bf16"))
    assert got == want


def test_verify_judges_one_quantized_side_by_cosine(qwen3, cli, tmp_path):
    hf, fp8, _ = qwen3
    res = cli("verify", hf, fp8, "--json")
    out = json.loads(res.out)
    assert res.code == 0 and out["criterion"] == "cosine" and out["min_cosine"] >= 0.99, res.out
    assert out["quantized"] == [None, "fp8 block 32x32"]
    state = load_file(fp8 / "model.safetensors")    # scales off by 8x: the verdict must fail
    (tmp_path / "bad").mkdir()
    for f in fp8.glob("*.json"):
        (tmp_path / "bad" / f.name).write_text(f.read_text())
    save_file({k: v * 8 if k.endswith("_scale_inv") else v for k, v in state.items()},
              tmp_path / "bad" / "model.safetensors")
    assert cli("verify", hf, tmp_path / "bad").code == 1


def test_int4_groups_dequantize_like_compressed_tensors(cli, tmp_path):
    hf = build_hf("llama", tmp_path / "hf")
    expect = quantize_folder(hf, tmp_path / "int4", scheme="int4-group", group=16)
    assert cli("export-hf", tmp_path / "int4", tmp_path / "bf16", "--dtype", "bfloat16").code == 0
    _same_bits(tensors(tmp_path / "bf16"), expect)
    res = cli("inspect", tmp_path / "int4", "--json")
    q = json.loads(res.out)["quantization"]
    assert q["scheme"] == "compressed-tensors int4 group 16" and q["quantized_tensors"] == 14


def test_inspect_names_the_scheme_and_the_bytes(deepseek, cli):
    res = cli("inspect", deepseek[1])
    assert res.code == 0 and "fp8 block 16x16" in res.out and "bytes quantized" in res.out
    assert "bfloat16 <- fp8-block" in res.out


def _broken(fp8: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    cfg = json.loads((fp8 / "config.json").read_text())
    state = load_file(fp8 / "model.safetensors")
    cfg, state = edit(cfg, state)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(state, dst / "model.safetensors")
    return dst


KEY = "model.layers.1.self_attn.o_proj.weight"
BAD = {   # name -> (edit, words the one-line error must hold)
    "scale-shape": (lambda c, s: (c, {**s, KEY + "_scale_inv": s[KEY + "_scale_inv"][:, :1].contiguous()}),
                    [KEY + "_scale_inv", "needs"]),
    "missing-scale": (lambda c, s: (c, {k: v for k, v in s.items() if k != KEY + "_scale_inv"}), [KEY, "no scale"]),
    "nan-scale": (lambda c, s: (c, {**s, KEY + "_scale_inv": s[KEY + "_scale_inv"] * float("nan")}),
                  [KEY + "_scale_inv", "NaN"]),
    "zero-scale": (lambda c, s: (c, {**s, KEY + "_scale_inv": s[KEY + "_scale_inv"] * 0}), [KEY + "_scale_inv", "zero"]),
    "negative-scale": (lambda c, s: (c, {**s, KEY + "_scale_inv": -s[KEY + "_scale_inv"]}),
                       [KEY + "_scale_inv", "negative"]),
    "no-config": (lambda c, s: ({k: v for k, v in c.items() if k != "quantization_config"}, s),
                  ["float8_e4m3fn", "quantization_config"]),
    "unknown-method": (lambda c, s: ({**c, "quantization_config": {"quant_method": "hqq"}}, s),
                       ["config.json", "'hqq'", "not supported"]),
    "orphan-scale": (lambda c, s: (c, {**s, "model.layers.0.mlp.extra.weight_scale_inv": torch.ones(1, 1)}),
                     ["extra.weight_scale_inv", "no weight"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_quantized_inputs_get_one_line_and_write_nothing(deepseek, cli, tmp_path, name):
    edit, words = BAD[name]
    src = _broken(deepseek[1], tmp_path / "src", edit)
    res = cli("convert", "hf-to-native", src, tmp_path / "out")
    assert res.code == 2, res.err
    line = res.err.strip()
    assert "\n" not in line and "Traceback" not in line
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "out").exists()


def test_fp8_from_megatron_and_native_equals_fp8_from_hf(qwen3, cli, tmp_path):
    """The RL path: weights trained in Megatron (any layout) roll out as the same FP8 bytes as from HF."""
    hf = qwen3[0]
    assert cli("export-hf", hf, tmp_path / "direct", "--quantize", "fp8").code == 0
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "meg", "--tp", "2", "--pp", "2").code == 0
    assert cli("convert", "hf-to-native", hf, tmp_path / "native").code == 0
    want = tensors(tmp_path / "direct")
    for src in ("meg", "native"):
        assert cli("export-hf", tmp_path / src, tmp_path / f"{src}-fp8", "--quantize", "fp8").code == 0
        _same_bits(tensors(tmp_path / f"{src}-fp8"), want)


def test_per_tensor_fp8_with_input_scales_dequantizes_and_keeps(cli, tmp_path):
    hf = build_hf("qwen2", tmp_path / "hf")
    expect = quantize_folder(hf, tmp_path / "fp8", scheme="fp8-tensor", input_scale=True)
    assert cli("export-hf", tmp_path / "fp8", tmp_path / "bf16", "--dtype", "bfloat16").code == 0
    _same_bits(tensors(tmp_path / "bf16"), expect)                  # input scales are not weights: dropped
    assert cli("export-hf", tmp_path / "fp8", tmp_path / "kept").code == 0
    _same_bits(tensors(tmp_path / "kept"), load_file(tmp_path / "fp8" / "model.safetensors"))


def test_a_different_fp8_scheme_is_requantized_once_the_same_one_is_copied(deepseek, cli, tmp_path):
    fp8 = deepseek[1]                                                # 16 x 16 blocks
    assert cli("export-hf", fp8, tmp_path / "q128", "--quantize", "fp8").code == 0
    got = tensors(tmp_path / "q128")
    assert got["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 1)   # 24 x 45 rows
    assert cli("export-hf", tmp_path / "q128", tmp_path / "again", "--quantize", "fp8").code == 0
    _same_bits(tensors(tmp_path / "again"), got)
