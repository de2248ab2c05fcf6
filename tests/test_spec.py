"""Specs load, validate, and a bad spec names the file, the entry and the problem."""

import pytest

from rosetool.errors import SpecError
from rosetool.mappings import expr
from rosetool.mappings.spec import all_specs, get_spec, parse_spec

GOOD = """
name: toy
architecture: ToyForCausalLM
config: {vocab_size: null, hidden_size: null, num_layers: null}
tensors:
  embed.weight: [vocab_size, hidden_size]
  layers.{i}.w: [hidden_size, hidden_size]
formats:
  hf:
    tensors:
      emb: embed.weight
      h.{i}.w: {from: [layers.{i}.w], ops: [transpose]}
"""


def test_shipped_specs_load_with_every_variant():
    names = {s.name for s in all_specs()}
    assert {"gpt2", "llama", "mistral", "qwen2", "qwen3"} <= names
    for spec in all_specs():
        assert {"hf", "native"} <= set(spec.formats)


def test_variants_override_only_what_they_name():
    qwen2, llama = get_spec("qwen2"), get_spec("llama")
    field = {f.canonical: f for f in qwen2.format("hf").config}
    assert field["qkv_bias"].value is True and field["qkv_bias"].key is None
    assert {f.canonical: f for f in llama.format("hf").config}["qkv_bias"].key == "attention_bias"


def test_good_toy_spec_parses():
    (spec,) = parse_spec(GOOD, "toy.yaml")
    assert spec.format("hf").entries[1].ops == ("transpose",)


@pytest.mark.parametrize("change, message", [
    (("ops: [transpose]", "ops: [twist]"), "unknown op 'twist'"),
    (("from: [layers.{i}.w]", "from: [layers.{i}.x]"), "'layers.{i}.x', which is not a canonical tensor"),
    (("      emb: embed.weight\n", ""), "canonical tensor(s) ['embed.weight'] are not mapped"),
    (("[vocab_size, hidden_size]", "[vocab_size, hiden_size]"), "unknown name(s) ['hiden_size']"),
    (("[vocab_size, hidden_size]", "[vocab_size, __import__('os')]"), "Call is not allowed"),
    (("tensors:\n  embed", "tensorz:\n  embed"), "unknown key(s) ['tensorz']"),
    (("h.{i}.w:", "h.w:"), "per-layer tensors must map to per-layer keys"),
    (("name: toy", "name: [toy"), "not valid YAML"),
])
def test_bad_specs_are_refused_with_file_and_entry(change, message):
    with pytest.raises(SpecError) as info:
        parse_spec(GOOD.replace(*change), "toy.yaml")
    assert str(info.value).startswith("toy.yaml: ")
    assert message in str(info.value)


def test_expressions_are_sandboxed_and_exact():
    assert expr.evaluate("num_heads * head_dim // 2", {"num_heads": 4, "head_dim": 6}) == 12
    assert expr.evaluate("not tie and n > 1", {"tie": False, "n": 2}) is True
    for bad in ["__import__('os')", "x.y", "[1, 2]", "lambda: 1"]:
        with pytest.raises(expr.ExprError):
            expr.evaluate(bad, {"x": 1})


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(SpecError, match="unknown architecture 'nope'; known: .*gpt2"):
        get_spec("nope")


def test_mappings_cli(cli):
    listed = cli("mappings", "list", "--json")
    assert listed.code == 0 and '"qwen3"' in listed.out
    shown = cli("mappings", "show", "gpt2", "--format", "hf")
    assert shown.code == 0 and "transformer.h.{i}.attn.c_attn.weight" in shown.out


EXPERTS = """
name: toymoe
architecture: ToyMoeForCausalLM
config: {vocab_size: null, hidden_size: null, num_layers: null, num_experts: null, ffn: null, mlp_only_layers: []}
tensors:
  layers.{i}.dense: {shape: [ffn, hidden_size], when: i in mlp_only_layers}
  layers.{i}.experts.{e}.gate: {shape: [ffn, hidden_size], when: i not in mlp_only_layers}
  layers.{i}.experts.{e}.up: {shape: [ffn, hidden_size], when: i not in mlp_only_layers}
formats:
  hf:
    tensors:
      h.{i}.dense: layers.{i}.dense
      h.{i}.e{e}.gate: layers.{i}.experts.{e}.gate
      h.{i}.e{e}.up: {from: layers.{i}.experts.{e}.up, tp: {dim: 0, parts: num_experts}}
  native:
    tensors:
      h.{i}.dense: layers.{i}.dense
      h.{i}.experts: {from: [layers.{i}.experts.{e}.gate, layers.{i}.experts.{e}.up], ops: [{stack: 2}]}
"""


def test_expert_range_and_layer_conditions_expand_from_the_config():
    from rosetool.converters.plan import expand_format
    (spec,) = parse_spec(EXPERTS, "toymoe.yaml")
    cfg = {"vocab_size": 5, "hidden_size": 3, "num_layers": 3, "num_experts": 2, "ffn": 7, "mlp_only_layers": [1]}
    hf = {s.key: s for s in expand_format(spec, spec.format("hf"), cfg)}
    assert sorted(hf) == ["h.0.e0.gate", "h.0.e0.up", "h.0.e1.gate", "h.0.e1.up", "h.1.dense",
                          "h.2.e0.gate", "h.2.e0.up", "h.2.e1.gate", "h.2.e1.up"]
    assert hf["h.2.e1.up"].sources == ("layers.2.experts.1.up",) and hf["h.2.e1.up"].tp["parts"] == "num_experts"
    native = {s.key: s for s in expand_format(spec, spec.format("native"), cfg)}
    assert sorted(native) == ["h.0.experts", "h.1.dense", "h.2.experts"]
    assert native["h.2.experts"].sources == ("layers.2.experts.0.gate", "layers.2.experts.0.up",
                                             "layers.2.experts.1.gate", "layers.2.experts.1.up")
    assert native["h.2.experts"].shape == (2, 14, 3)


@pytest.mark.parametrize("change, message", [
    (("h.{i}.e{e}.gate:", "h.{i}.gate:"), "'h.{i}.gate' takes every expert's tensors, so its ops must stack them"),
    (("      h.{i}.e{e}.gate: layers.{i}.experts.{e}.gate\n", ""), "['layers.{i}.experts.{e}.gate'] are not mapped"),
    (("h.{i}.dense: layers.{i}.dense\n      h.{i}.experts", "h.{i}.e{e}.dense: layers.{i}.dense\n      h.{i}.experts"),
     "a per-expert key must be made from per-expert tensors"),
    (("when: i in mlp_only_layers}", "when: j in mlp_only_layers}"), "unknown name(s) ['j']"),
])
def test_bad_expert_specs_are_refused(change, message):
    with pytest.raises(SpecError) as info:
        parse_spec(EXPERTS.replace(*change), "toymoe.yaml")
    assert message in str(info.value)
