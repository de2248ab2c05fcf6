"""Megatron formats for sequential GPT-NeoX, Phi-3/Phi-4 and GLM, and the families megatron-core cannot express.

Each case is a tiny random transformers model (odd sizes; norms and biases redrawn too, so a swapped tensor
cannot hide behind ones and zeros). Three proofs per case: HF -> Megatron -> HF is bit-identical at several
TP/PP layouts; megatron-core 0.16.1 builds a GPTModel from the args rosetool wrote, loads the rank file
strictly, and its logits match transformers' (fp32, 1e-4); and those args, stripped of rosetool's own
fields, read back to the same canonical config. Every family or setting megatron-core lacks is refused in
one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="CI installs megatron-core==0.16.1; these tests need it")

import megatron_ref as ref
from conftest import hf_logits
from test_families import (GEMMA, GEMMA2, GEMMA3, GEMMA3_ROPE, GLM, GPTJ, NEOX, PHI2, PHI3, VOCAB, build,
                           tensors)

from rosetool.cli.app import main
from rosetool.converters.megatron.args import config_from_args, spec_for_args
from rosetool.converters.config_map import read_config
from rosetool.converters.sources import open_checkpoint

NEOX4 = {**NEOX, "hidden_size": 80, "num_attention_heads": 4}     # head_dim 20, four heads: TP2 splits them
PHI3_GQA2 = {**PHI3, "hidden_size": 108, "num_attention_heads": 6, "num_key_value_heads": 2}   # head_dim 18
CASES = {   # name -> (model_type, config): each family's booleans both ways, partial factors other than 0.5
    "neox-untied": ("gpt_neox", {**NEOX4, "rotary_pct": 0.4, "use_parallel_residual": False, "attention_bias": True}),
    "neox-tied-tanh": ("gpt_neox", {**NEOX4, "rotary_pct": 0.7, "use_parallel_residual": False, "attention_bias": True,
                                    "hidden_act": "gelu_new", "tie_word_embeddings": True, "intermediate_size": 86}),
    "phi3-gqa": ("phi3", {**PHI3_GQA2}),
    "phi4-mini-partial-tied": ("phi3", {**PHI3_GQA2, "partial_rotary_factor": 0.8, "tie_word_embeddings": True,
                                        "sliding_window": 128}),    # 14 of 18 dims; a window no sequence exceeds
    "glm-bias-gqa": ("glm", {**GLM}),
    "glm-nobias-tied-mha": ("glm", {**GLM, "attention_bias": False, "tie_word_embeddings": True,
                                    "num_key_value_heads": 4, "partial_rotary_factor": 0.75}),
}
LAYOUTS = {"tp1": (), "tp2": ("--tp", 2), "pp2": ("--pp", 2), "te-tp2": ("--tp", 2, "--te-layout"),
           "torch_dist": ("--format", "torch_dist")}
IDS = torch.tensor([[0, 5, 17, 95, 42, 3, 64, 8, 11, 2, 90], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
RANK0 = "release/mp_rank_00/model_optim_rng.pt"


def run(*argv: object) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 0


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[str, Path]:
    model_type, config = CASES[request.param]
    return request.param, build(model_type, config, tmp_path_factory.mktemp(request.param) / "hf")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_megatron_hf_is_bit_identical(case, layout, tmp_path) -> None:
    name, hf = case
    run("convert", "hf-to-megatron", hf, tmp_path / "mg", *LAYOUTS[layout])
    run("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert a.keys() == b.keys(), name
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, layout, k)
    assert open_checkpoint(tmp_path / "back").config == open_checkpoint(hf).config, name


def test_pipeline_stages_round_trip(tmp_path) -> None:
    """PP2 and TP2 x PP2 with a tied head: the last stage's copy of the embedding is written and left out on read."""
    hf = build("glm", {**GLM, "attention_bias": True, "tie_word_embeddings": True, "partial_rotary_factor": 0.75},
               tmp_path / "hf")
    for tp in (1, 2):
        run("convert", "hf-to-megatron", hf, tmp_path / f"pp{tp}", "--tp", tp, "--pp", 2)
        run("convert", "megatron-to-hf", tmp_path / f"pp{tp}", tmp_path / f"back{tp}")
        a, b = tensors(hf), tensors(tmp_path / f"back{tp}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tp


@pytest.fixture(scope="module")
def mcore() -> Iterator[None]:
    with ref.single_process():
        yield


def test_megatron_core_logits_match_transformers(case, mcore, tmp_path) -> None:
    """The proof: megatron-core's own GPTModel, shaped only by the args rosetool wrote, runs the same model."""
    name, hf = case
    run("convert", "hf-to-megatron", hf, tmp_path / "mg")
    got = ref.logits_from_rank_file(tmp_path / "mg" / RANK0, IDS)
    assert got.shape[-1] == 128    # padded to make_vocab_size_divisible_by
    torch.testing.assert_close(got[..., :VOCAB], hf_logits(hf, IDS), atol=1e-4, rtol=0, msg=name)


def test_torch_dist_loads_through_megatron_core(case, mcore, tmp_path) -> None:
    """torch_dist: megatron-core's own dist_checkpointing.load fills a GPTModel built from common.pt's args."""
    name, hf = case
    run("convert", "hf-to-megatron", hf, tmp_path / "mg", "--format", "torch_dist")
    got = ref.logits(ref.load_torch_dist(tmp_path / "mg" / "release"), IDS)
    torch.testing.assert_close(got[..., :VOCAB], hf_logits(hf, IDS), atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["glm-bias-gqa", "neox-untied"])
def test_tp2_ranks_match_transformers_in_two_process_gloo(name, tmp_path) -> None:
    """Interleaved and rotate-half partial rotary with each rank holding half the heads."""
    hf = build(*CASES[name], tmp_path / "hf")
    run("convert", "hf-to-megatron", hf, tmp_path / "tp2", "--tp", 2)
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.tp_worker, args=(2, str(tmp_path / "tp2" / "release"), IDS, str(out),
                                                     ref.free_port()), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out)[..., :VOCAB], hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_megatron_lm_args_alone_read_back_to_the_same_config(case, tmp_path) -> None:
    """A Megatron-LM run resumed from our checkpoint keeps only its own args: those must say the whole model."""
    name, hf = case
    run("convert", "hf-to-megatron", hf, tmp_path / "mg")
    args = ref.load_rank(tmp_path / "mg" / RANK0)[0]
    written, family = dict(args.rosetool_config), args.rosetool_architecture
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("rosetool_")})
    spec = spec_for_args(plain, name)
    back = read_config(spec, spec.format("megatron"), config_from_args(plain, written["vocab_size"]), name)
    # token ids, and a window as long as max_position_embeddings (which changes nothing), have no Megatron-LM arg
    carried = {k for k in written if k not in ("bos_token_id", "eos_token_id", "sliding_window")}
    if spec.name != family:    # Phi-3 with full rotary is Llama math; Megatron-LM's args cannot tell them apart
        assert (family, spec.name) == ("phi3", "llama"), name
        carried &= set(back)
    assert {k: back[k] for k in carried} == {k: written[k] for k in carried}, name


FOREIGN = {   # Megatron-LM args with no rosetool fields: what a run of megatron-core itself would save
    "glm": dict(normalization="RMSNorm", swiglu=True, openai_gelu=False, add_bias_linear=False, add_qkv_bias=True,
                num_query_groups=2, group_query_attention=True, rotary_percent=0.6, rotary_interleaved=True,
                layernorm_epsilon=1e-5, untie_embeddings_and_output_weights=True),
    "gpt_neox": dict(normalization="LayerNorm", swiglu=False, openai_gelu=False, add_bias_linear=True,
                     add_qkv_bias=False, num_query_groups=4, group_query_attention=False, rotary_percent=0.4,
                     rotary_interleaved=False, layernorm_epsilon=1e-5, untie_embeddings_and_output_weights=False),
}


def _save_foreign(fields: dict, folder: Path) -> torch.nn.Module:
    args = argparse.Namespace(
        num_layers=2, hidden_size=80, ffn_hidden_size=84, num_attention_heads=4, kv_channels=20,
        max_position_embeddings=128, padded_vocab_size=128, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, position_embedding_type="rope",
        rotary_base=10000, qk_layernorm=False, params_dtype=torch.float32, **fields)
    model = ref.build_model(args)
    ref.randomise(model)
    ref.save_torch(model, args, folder, 10)
    return model


@pytest.mark.parametrize("family", sorted(FOREIGN))
def test_megatron_core_checkpoint_reads_as_the_family(family, mcore, tmp_path) -> None:
    """The other direction: megatron-core's own randomised model, saved as Megatron-LM does, exports to an HF
    folder of the right family that transformers runs with megatron-core's logits."""
    from transformers import AutoModelForCausalLM
    model = _save_foreign(FOREIGN[family], tmp_path / "mg")
    run("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    # GlmConfig's default pad_token_id (151329) only fits GLM's real vocabulary; Megatron args carry no pad id
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", pad_token_id=0).eval()
    with torch.no_grad():
        want = hf(IDS).logits
    torch.testing.assert_close(ref.logits(model, IDS)[..., :VOCAB], want, atol=1e-4, rtol=0)


def test_megatron_core_gelu_rotary_gqa_is_refused(mcore, cli, tmp_path) -> None:
    """GELU + rotary reads as GPT-NeoX, whose HF config has no K/V head count: GQA would be silently lost."""
    _save_foreign({**FOREIGN["gpt_neox"], "num_query_groups": 2, "group_query_attention": True}, tmp_path / "mg")
    res = cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    said = (res.err + res.out).strip()
    assert res.code == 2 and "grouped-query attention matches no supported architecture" in said, said
    assert len(said.splitlines()) == 1 and not (tmp_path / "hf").exists(), said


REFUSED = {   # name -> (model_type, config, what the one line must say)
    "gptj": ("gptj", {**GPTJ, "rotary_dim": 6}, "no parallel attention + MLP block"),
    "phi2": ("phi", {**PHI2, "partial_rotary_factor": 0.4}, "no parallel attention + MLP block"),
    "neox-parallel": ("gpt_neox", {**NEOX4, "rotary_pct": 0.4, "use_parallel_residual": True},
                      "parallel_residual=True: megatron-core's TransformerLayer has no parallel attention + MLP block"),
    "neox-mlp-bias-only": ("gpt_neox", {**NEOX4, "rotary_pct": 0.4, "use_parallel_residual": False,
                                        "attention_bias": False}, "add_bias_linear biases attention output and MLP"),
    "neox-relu": ("gpt_neox", {**NEOX4, "rotary_pct": 0.4, "use_parallel_residual": False, "hidden_act": "relu"},
                  "activation='relu'"),
    "phi3-window": ("phi3", {**PHI3, "sliding_window": 7}, "sliding_window=7: megatron-core's local attention drops"),
    "mistral-window": ("mistral", dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       sliding_window=6), "sliding_window=6"),
    "gemma": ("gemma", {**GEMMA}, "no embedding multiplier"),
    "gemma2": ("gemma2", {**GEMMA2}, "megatron-core has no soft-capping"),
    "gemma3": ("gemma3_text", {**GEMMA3, "rope_parameters": GEMMA3_ROPE}, "no post-attention/post-MLP norm slot"),
    "glm4": ("glm4", {**GLM}, "GLM-4-0414's sandwich norms"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("extra", [(), ("--te-layout",)], ids=["local", "te"])
def test_what_megatron_core_lacks_is_refused_in_one_line(name, extra, cli, tmp_path) -> None:
    model_type, config, message = REFUSED[name]
    hf = build(model_type, config, tmp_path / "hf")
    res = cli("convert", "hf-to-megatron", hf, tmp_path / "mg", *extra)
    said = (res.err + res.out).strip()
    assert res.code == 2 and message in said and "Traceback" not in said, said
    assert len(said.splitlines()) == 1, said
    assert not (tmp_path / "mg").exists()     # nothing written, not even a partial folder


def test_help_lists_the_refused_families(cli) -> None:
    text = " ".join(cli("convert", "hf-to-megatron", "--help").out.split())
    for said in ("GPT-J, Phi-1/2 and parallel-residual GPT-NeoX (no parallel attention + MLP block)",
                 "Gemma 1", "Gemma 2 (no logit soft-capping", "Gemma 3 and GLM-4-0414 (no sandwich norms)",
                 "sequential GPT-NeoX", "Phi-3/Phi-4", "GLM (GlmForCausalLM", "a sliding window shorter"):
        assert said in text, said


def test_a_spec_cannot_both_map_and_refuse_a_format() -> None:
    from rosetool.errors import SpecError
    from rosetool.mappings.spec import parse_spec
    text = ("name: t\nconfig: {n: null}\ntensors: {w: [n]}\nformats: {native: {tensors: {w: w}}}\n"
            "refused: {native: because}\n")
    with pytest.raises(SpecError, match="refused.native: the format is both mapped and refused"):
        parse_spec(text, "t.yaml")
