"""Megatron-Bridge checkpoints: read (no common.pt, the model in run_config.yaml) and the hostile run configs.

The fixtures are built in Bridge's exact layout by bridge_fixtures.py (its run_config.yaml made from the HF
config the way Bridge's provider_bridge makes it), for Qwen3, Qwen3-MoE at EP2 and DeepSeek-V3 at TP2 x EP2, in
the Transformer Engine spec's and the local spec's names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig
from bridge_fixtures import (TOKENIZER, bridge_checkpoint, config_defaults, model_section, nemo2_checkpoint,
                             to_bridge_layout)
from conftest import build_hf
from family_checks import tensors
from moe_models import build_moe_hf
from test_deepseek import build as build_deepseek
from test_deepseek_megatron import MG

from rosetool.converters.megatron import Layout
from rosetool.converters.megatron.bridge import NEUTRAL

# transformers drops DeepSeek's multi-token-prediction layer, so no MTP (Bridge would expect its tensors)
V3 = {**MG, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 44, "kv_lora_rank": 16,
      "q_lora_rank": 20, "n_group": 4, "num_mtp_layers": 0, "topk_group": 2, "num_experts_per_tok": 4,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                          "rope_theta": 10000.0}}
SOURCES = {   # name -> (builder, layout saved at)
    "qwen3": (lambda p: build_hf("qwen3", p, head_dim=24), Layout(2, 1, 1)),
    "qwen3_moe": (lambda p: build_moe_hf("qwen3_moe", p, decoder_sparse_step=1), Layout(1, 1, 2)),
    "deepseek_v3": (lambda p: build_deepseek("deepseek_v3", V3, p), Layout(2, 1, 2)),
}
CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "num_experts", "num_local_experts", "n_routed_experts",
               "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "q_lora_rank", "kv_lora_rank",
               "n_group", "topk_group", "first_k_dense_replace", "n_shared_experts", "routed_scaling_factor",
               "rope_parameters", "max_position_embeddings")


def ok(cli, *argv) -> str:
    res = cli(*argv)
    assert res.code == 0, res.err + res.out
    return res.out


def refused(cli, *argv) -> str:
    res = cli(*argv)
    text = res.err + res.out
    assert res.code == 2 and "Traceback" not in text, text
    return " ".join(text.split())


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory) -> tuple[str, Path]:
    build, _ = SOURCES[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param) / "hf")


def same_tensors(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("spec", ["te", "local"])
def test_bridge_checkpoint_exports_bit_identical_to_the_hf_source(source, spec, cli, tmp_path) -> None:
    name, hf = source
    ckpt = bridge_checkpoint(hf, tmp_path / "ckpt", SOURCES[name][1], spec)
    assert not (ckpt / "iter_0000000" / "common.pt").exists()
    ok(cli, "convert", "megatron-to-hf", ckpt, tmp_path / "back")
    same_tensors(hf, tmp_path / "back")
    src, out = (AutoConfig.from_pretrained(p).to_dict() for p in (hf, tmp_path / "back"))
    for key in CONFIG_KEYS:
        assert src.get(key) == out.get(key), key
    for file, text in TOKENIZER.items():    # the saved tokenizer/ travels into the export
        assert (tmp_path / "back" / file).read_text() == text
    res = cli("verify", ckpt, hf, "--json")
    assert res.code == 0 and json.loads(res.out)["passed"] is True, res.out + res.err


def test_an_iteration_folder_reads_on_its_own(source, cli, tmp_path) -> None:
    name, hf = source
    ckpt = bridge_checkpoint(hf, tmp_path / "ckpt", SOURCES[name][1])
    ok(cli, "convert", "megatron-to-hf", ckpt / "iter_0000000", tmp_path / "back")
    same_tensors(hf, tmp_path / "back")


def test_inspect_shows_provider_saved_parallel_sizes_and_hf_model_id(source, cli, tmp_path) -> None:
    name, hf = source
    layout = SOURCES[name][1]
    ckpt = bridge_checkpoint(hf, tmp_path / "ckpt", layout)
    data = json.loads(ok(cli, "inspect", ckpt, "--json"))
    bridge = data["info"]["megatron"]["bridge"]
    provider = "MLAModelProvider" if name == "deepseek_v3" else "GPTModelProvider"
    assert bridge["provider"].endswith(provider) and bridge["hf_model_id"] == f"/lustre/fsw/models/{name}"
    assert bridge["saved_parallel"] == {"tensor": layout.tp, "pipeline": 1, "expert": layout.ep,
                                        "expert_tensor": layout.tp}
    text = " ".join(ok(cli, "inspect", ckpt).split())
    assert provider in text and f"/lustre/fsw/models/{name}" in text and f"TP={layout.tp}" in text


def test_a_megatron_core_torch_dist_save_in_bridge_layout_matches_its_logits(tmp_path) -> None:
    """megatron-core itself saves (two expert-parallel processes, each its own experts); the Bridge layout around
    its files has no args, only the run config; the HF export gives megatron-core's logits."""
    pytest.importorskip("megatron.core")
    import megatron_ref as ref
    from test_moe_dist import dist_args
    from test_moe_mcore import IDS, VOCAB, hf_logits
    from test_moe_megatron import run
    args = dist_args("mixtral", ep=2)
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.ep_worker, args=(2, str(tmp_path / "mg"), IDS, str(out), ref.free_port(), args,
                                                     True), nprocs=2, join=True)
    hf = {"model_type": "mixtral", "num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 56,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 128,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "num_local_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 24}
    model = {**model_section(hf, Layout(1, 1, 2), "local"), "num_moe_experts": 4, "qk_layernorm": False,
             "moe_router_pre_softmax": False, "rotary_base": 10000}
    to_bridge_layout(tmp_path / "ckpt", tmp_path / "mg" / "iter_0000001", model, tokenizer=False)
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (tmp_path / "ckpt" / "iter_0000000").iterdir()}
    assert run("convert", "megatron-to-hf", tmp_path / "ckpt", tmp_path / "hf", "--vocab-size", VOCAB) == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), torch.load(out)[..., :VOCAB], atol=1e-4, rtol=0)


# --- run_config.yaml is data: nothing it names is imported or called ---------------------------------------

@pytest.fixture(scope="module")
def qwen3_bridge(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen3_bridge")
    return bridge_checkpoint(build_hf("qwen3", root / "hf", head_dim=24), root / "ckpt", Layout(1, 1, 1))


def edited(ckpt: Path, dst: Path, edit) -> Path:
    shutil.copytree(ckpt, dst)
    path = dst / "iter_0000000" / "run_config.yaml"
    data = yaml.safe_load(path.read_text())
    result = edit(data)
    path.write_text(result if isinstance(result, str) else yaml.safe_dump(data))
    return dst


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Path:
    """A module that leaves a file behind if anything imports it, and os.system/subprocess that record calls."""
    import os
    import subprocess
    mod = tmp_path / "mods"
    mod.mkdir()
    marker = tmp_path / "imported"
    (mod / "rosetool_canary.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef run(*a, **k): pass\n")
    monkeypatch.syspath_prepend(str(mod))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    yield marker
    assert not calls and not marker.exists()


HOSTILE = {   # name -> edit of the parsed run config (a string return replaces the file)
    "model-target-os-system": lambda d: d["model"].update(_target_="os.system", _args_=["touch pwned"]),
    "model-target-module": lambda d: d["model"].update(_target_="rosetool_canary.run", _call_=True),
    "activation-os-system": lambda d: d["model"].update(activation_func={"_target_": "os.system",
                                                                         "_args_": ["touch pwned"]}),
    "python-tag": lambda d: "model: !!python/object/apply:os.system ['touch pwned']\n",
    "python-name-tag": lambda d: "model: !!python/name:rosetool_canary.run\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_run_config_runs_nothing_and_is_refused_in_one_line(name, qwen3_bridge, canary, cli, tmp_path):
    ckpt = edited(qwen3_bridge, tmp_path / "evil", HOSTILE[name])
    text = refused(cli, "convert", "megatron-to-hf", ckpt, tmp_path / "out")
    assert "run_config.yaml" in text
    assert not (tmp_path / "out").exists() and not Path("pwned").exists()


def test_targets_elsewhere_in_the_config_stay_data(qwen3_bridge, canary, cli, tmp_path):
    """Sections rosetool does not read may name anything: they are never looked at, let alone imported."""
    def edit(d):
        d["tokenizer"]["_target_"] = "rosetool_canary.run"
        d["model"]["init_method"] = {"_target_": "rosetool_canary.run", "_call_": True}
        d["model"]["output_layer_init_method"] = {"_target_": "os.system", "_args_": ["touch pwned"]}
    ok(cli, "convert", "megatron-to-hf", edited(qwen3_bridge, tmp_path / "ckpt", edit), tmp_path / "out")
    assert not Path("pwned").exists()


UNMAPPED = {   # field -> value that changes the math
    "softmax_type": "learnable", "mtp_num_layers": 1, "qk_l2_norm": True, "layernorm_zero_centered_gamma": True,
    "experimental_attention_variant": "gated_delta_net", "position_embedding_type": "yarn",
    "normalization": "L2Norm", "activation_func": {"_call_": False, "_target_": "megatron.core.activations.squared_relu"},
}


@pytest.mark.parametrize("field", sorted(UNMAPPED))
def test_a_math_changing_field_rosetool_does_not_map_is_refused_by_name(field, qwen3_bridge, cli, tmp_path):
    ckpt = edited(qwen3_bridge, tmp_path / "ckpt", lambda d: d["model"].update({field: UNMAPPED[field]}))
    text = refused(cli, "convert", "megatron-to-hf", ckpt, tmp_path / "out")
    assert f"model.{field}" in text and "run_config.yaml" in text


def test_other_models_and_missing_shape_are_refused(qwen3_bridge, cli, tmp_path):
    mamba = edited(qwen3_bridge, tmp_path / "mamba", lambda d: d["model"].update(
        _target_="megatron.bridge.models.mamba.mamba_provider.MambaModelProvider"))
    assert "MambaModelProvider is not a GPT decoder" in refused(cli, "inspect", mamba)
    shape = edited(qwen3_bridge, tmp_path / "shape", lambda d: d["model"].pop("num_layers"))
    assert "model.num_layers is missing" in refused(cli, "inspect", shape)
    wrong = edited(qwen3_bridge, tmp_path / "wrong", lambda d: d["model"].update(hidden_size=32))
    assert "has shape" in refused(cli, "convert", "megatron-to-hf", wrong, tmp_path / "out")


def test_a_symlinked_tokenizer_folder_is_refused(qwen3_bridge, cli, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen3_bridge, ckpt)
    shutil.rmtree(ckpt / "iter_0000000" / "tokenizer")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokenizer.json").write_text("{}")
    (ckpt / "iter_0000000" / "tokenizer").symlink_to(tmp_path / "elsewhere")
    assert "tokenizer: a symlink; refused" in refused(cli, "convert", "megatron-to-hf", ckpt, tmp_path / "out")


def test_the_neutral_values_are_megatron_cores_defaults() -> None:
    """Each refused field's accepted value is what megatron-core's own TransformerConfig defaults to."""
    pytest.importorskip("megatron.core")
    defaults = {**config_defaults(mla=True), **config_defaults(mla=False)}
    known = {k: v for k, v in NEUTRAL.items() if k in defaults}
    assert len(known) >= 10, sorted(known)
    for field, neutral in known.items():
        assert defaults[field] == neutral[0], field


# --- NeMo 2: weights/ (torch_dist) + context/model.yaml, the same provider fields -------------------------

@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_a_nemo2_checkpoint_exports_bit_identical_to_the_hf_source(name, cli, tmp_path) -> None:
    build, _ = SOURCES[name]
    hf = build(tmp_path / "hf")
    ckpt = nemo2_checkpoint(hf, tmp_path / "nemo")
    ok(cli, "convert", "megatron-to-hf", ckpt, tmp_path / "back")
    same_tensors(hf, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == TOKENIZER["tokenizer.json"]
    data = json.loads(ok(cli, "inspect", ckpt, "--json"))
    assert data["info"]["megatron"]["bridge"]["format"] == "NeMo 2"
    assert data["info"]["params"]["padded_vocab_size"] == 128


def test_a_nemo2_config_naming_other_code_is_refused(cli, tmp_path, canary) -> None:
    ckpt = nemo2_checkpoint(build_hf("qwen3", tmp_path / "hf", head_dim=24), tmp_path / "nemo")
    path = ckpt / "context" / "model.yaml"
    data = yaml.safe_load(path.read_text())
    data["config"]["_target_"] = "rosetool_canary.run"
    path.write_text(yaml.safe_dump(data))
    assert "is not a NeMo 2 model config" in refused(cli, "inspect", ckpt)
