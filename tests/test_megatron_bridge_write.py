"""`hf-to-megatron --bridge` and `reshard --bridge`: Megatron-Bridge's layout, read back bit for bit, a model
section with the fields Bridge's own import writes, and megatron-core building the model from that section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from bridge_fixtures import bridge_checkpoint, config_defaults, model_section
from conftest import build_hf
from test_megatron_bridge import SOURCES, ok, refused, same_tensors

from rosetool.converters.megatron import Layout

FLAGS = {name: ["--tp", layout.tp, "--ep", layout.ep] for name, (_, layout) in SOURCES.items()}
# what Bridge's provider_bridge sets that decides the shape and the math (make_vocab_size_divisible_by only
# matters with should_pad_vocab, and Bridge picks its own)
SHAPE = ("_target_", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
         "vocab_size", "should_pad_vocab", "seq_length", "layernorm_epsilon", "normalization", "gated_linear_unit",
         "activation_func", "qk_layernorm", "add_qkv_bias", "add_bias_linear", "position_embedding_type",
         "rotary_base", "rotary_percent", "share_embeddings_and_output_weights", "tensor_model_parallel_size",
         "pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
         "transformer_layer_spec", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
         "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_num_groups",
         "moe_router_group_topk", "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size",
         "moe_layer_freq", "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
         "qk_pos_emb_head_dim", "v_head_dim", "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast",
         "beta_slow", "original_max_position_embeddings")


def written_model(ckpt: Path) -> dict:
    return yaml.safe_load((ckpt / "iter_0000000" / "run_config.yaml").read_text())["model"]


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory) -> tuple[str, Path]:
    build, _ = SOURCES[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param) / "hf")


def test_bridge_output_has_bridges_layout_and_reads_back_bit_identically(source, cli, tmp_path) -> None:
    name, hf = source
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "br", "--bridge", *FLAGS[name])
    it = tmp_path / "br" / "iter_0000000"
    assert (tmp_path / "br" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert {"run_config.yaml", "metadata.json", "train_state.pt", ".metadata"} <= {p.name for p in it.iterdir()}
    assert (tmp_path / "br" / "latest_train_state.pt").is_file()
    assert json.loads((it / "metadata.json").read_text()) == {"sharded_backend": "torch_dist",
                                                             "sharded_backend_version": 1}
    assert torch.load(it / "train_state.pt", weights_only=True)["step"].item() == 0
    ok(cli, "convert", "megatron-to-hf", tmp_path / "br", tmp_path / "back")
    same_tensors(hf, tmp_path / "back")


def _same(a, b) -> bool:
    return float(a) == float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
        and not isinstance(a, bool) else a == b


def test_the_model_section_carries_the_fields_bridge_writes(source, cli, tmp_path) -> None:
    """Every shape and math field of the section Bridge's import makes from the same HF config (bridge_fixtures),
    with the same value; rosetool's output is in the local names for MoE (so `local_layer_spec`) unless
    --te-layout."""
    name, hf = source
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "br", "--bridge", *FLAGS[name])
    bridge = model_section(json.loads((hf / "config.json").read_text()), SOURCES[name][1],
                           "local" if name == "qwen3_moe" else "te")
    ours = written_model(tmp_path / "br")
    defaults = config_defaults(mla=name == "deepseek_v3")     # what a field rosetool leaves out becomes
    fields = [k for k in SHAPE if bridge.get(k) is not None]
    assert len(fields) > 25
    differ = {k: (ours.get(k, defaults.get(k)), bridge[k]) for k in fields
              if not _same(ours.get(k, defaults.get(k)), bridge[k])}
    assert not differ
    assert ours["hf_model_id"] == str(hf.resolve())


def test_te_layout_moe_is_written_in_transformer_engine_names(cli, tmp_path) -> None:
    build, _ = SOURCES["qwen3_moe"]
    hf = build(tmp_path / "hf")
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "br", "--bridge", "--ep", 2, "--te-layout")
    model = written_model(tmp_path / "br")
    assert model["transformer_layer_spec"]["_target_"].endswith("default_layer_spec")
    from torch.distributed.checkpoint import FileSystemReader
    stored = FileSystemReader(str(tmp_path / "br" / "iter_0000000")).read_metadata().state_dict_metadata
    assert "decoder.layers.pre_mlp_layernorm.weight" in stored
    ok(cli, "convert", "megatron-to-hf", tmp_path / "br", tmp_path / "back")
    same_tensors(hf, tmp_path / "back")


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_other_families_round_trip_through_the_bridge_layout(family, cli, tmp_path) -> None:
    hf = build_hf(family, tmp_path / "hf")
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "br", "--bridge", "--tp", 2)
    ok(cli, "convert", "megatron-to-hf", tmp_path / "br", tmp_path / "back")
    same_tensors(hf, tmp_path / "back")
    res = cli("verify", tmp_path / "br", hf, "--json")
    assert res.code == 0 and json.loads(res.out)["passed"] is True, res.out + res.err


def test_reshard_to_and_from_the_bridge_layout(cli, tmp_path) -> None:
    """A torch-format TP2 x PP2 checkpoint -> Bridge's layout -> torch format at TP1 -> HF, bit for bit; a Bridge
    checkpoint's tokenizer/ and hf_model_id survive a reshard to Bridge's layout."""
    hf = build_hf("qwen3", tmp_path / "hf", head_dim=24)
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "torch", "--tp", 2, "--pp", 2)
    ok(cli, "reshard", tmp_path / "torch", tmp_path / "br", "--bridge", "--tp", 2)
    assert written_model(tmp_path / "br")["tensor_model_parallel_size"] == 2
    ok(cli, "reshard", tmp_path / "br", tmp_path / "tp1")
    ok(cli, "convert", "megatron-to-hf", tmp_path / "tp1", tmp_path / "back")
    same_tensors(hf, tmp_path / "back")
    src = bridge_checkpoint(hf, tmp_path / "bridge_src", Layout(1, 1, 1))
    ok(cli, "reshard", src, tmp_path / "br2", "--bridge", "--tp", 2)
    assert written_model(tmp_path / "br2")["hf_model_id"] == "/lustre/fsw/models/qwen3"
    assert (tmp_path / "br2" / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()
    ok(cli, "convert", "megatron-to-hf", tmp_path / "br2", tmp_path / "back2")
    same_tensors(hf, tmp_path / "back2")


def test_bridge_excludes_the_torch_format(cli, tmp_path) -> None:
    hf = build_hf("qwen3", tmp_path / "hf")
    assert "excludes --format torch" in refused(cli, "convert", "hf-to-megatron", hf, tmp_path / "o", "--bridge",
                                                "--format", "torch")


# --- megatron-core builds the model from the written model section, as Bridge's instantiate does ------------

ACTIVATIONS = {"torch.nn.functional.silu": torch.nn.functional.silu}


def core_model(model: dict):
    """TransformerConfig from the section's fields (the ones it declares; `_target_` mappings resolved from a
    fixed table), then megatron-core's GPTModel with the layer spec the section names."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = {k: v for k, v in model.items() if k in names and not isinstance(v, dict)}
    kwargs |= dict(activation_func=ACTIVATIONS[model["activation_func"]["_target_"]], params_dtype=torch.float32,
                   use_cpu_initialization=True, moe_token_dispatcher_type="allgather",
                   moe_router_load_balancing_type="none", moe_grouped_gemm=False)
    cfg = TransformerConfig(**kwargs)
    assert model["transformer_layer_spec"]["_target_"].endswith(("local_layer_spec", "default_layer_spec"))
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=cfg.normalization) \
        if cfg.num_moe_experts else get_gpt_layer_local_spec(normalization=cfg.normalization,
                                                             qk_layernorm=cfg.qk_layernorm)
    return GPTModel(cfg, spec, vocab_size=model["vocab_size"], max_sequence_length=model["seq_length"],
                    position_embedding_type=model["position_embedding_type"], rotary_base=model["rotary_base"],
                    rotary_percent=model["rotary_percent"], parallel_output=False,
                    share_embeddings_and_output_weights=model["share_embeddings_and_output_weights"]).eval()


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_megatron_core_builds_from_the_section_and_loads_the_tensors_strictly(name, cli, tmp_path) -> None:
    pytest.importorskip("megatron.core")
    import megatron_ref as ref
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM
    build, _ = SOURCES[name]
    hf = build(tmp_path / "hf")
    ok(cli, "convert", "hf-to-megatron", hf, tmp_path / "br", "--bridge")
    ids = torch.tensor([[0, 5, 17, 60, 42, 3, 64, 8, 11, 2, 33]])
    with ref.single_process():
        model = core_model(written_model(tmp_path / "br"))
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(tmp_path / "br" / "iter_0000000"))
        model.load_state_dict(state["model"], strict=True)
        got = ref.logits(model, ids)
    want = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, experts_implementation="eager")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
