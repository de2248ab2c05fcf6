"""The args namespace rosetool writes is a complete Megatron-LM one: every field parse_args defines (the table
tools/gen_megatron_lm_args.py generated from Megatron-LM's own parser), the model's values set; megatron-core
builds its TransformerConfig from it the way Megatron-Bridge's fallback to a checkpoint's args does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_hf
from test_megatron_bridge import SOURCES

from rosetool.converters.megatron.lm_defaults import megatron_lm_defaults, targets
from rosetool.converters.megatron.unpickler import load_rank_file

# What Megatron-Bridge 0.6's mlm_compat/arguments.py `_transformer_config_from_args` reads without a default
# (the ones the issue saw missing: `'Namespace' object has no attribute 'multi_latent_attention'`)
BRIDGE_READS = ("multi_latent_attention", "heterogeneous_layers_config_path", "no_persist_layer_norm",
                "params_dtype", "overlap_p2p_comm", "num_experts", "rotary_interleaved",
                "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "fp8_param_gather", "swiglu",
                "bias_swiglu_fusion", "bias_gelu_fusion", "squared_relu", "init_method_xavier_uniform",
                "group_query_attention", "num_query_groups", "config_logger_dir", "cp_comm_type", "is_hybrid_model")


def test_the_table_is_megatron_lms_parser_for_the_installed_megatron_core() -> None:
    table = megatron_lm_defaults()
    assert len(table) > 600
    assert {"multi_latent_attention", "num_layers", "ckpt_format", "use_checkpoint_args", "moe_router_topk",
            "kv_lora_rank", "cp_comm_type"} <= table.keys()
    tag, core = targets()
    assert tag == f"core_v{core}"
    pytest.importorskip("megatron.core")
    from megatron.core import __version__
    assert __version__.split(".")[:2] == core.split(".")[:2]


def _written_args(cli, hf: Path, out: Path, *flags) -> object:
    res = cli("convert", "hf-to-megatron", hf, out, *flags)
    assert res.code == 0, res.err
    if "torch_dist" in flags or "--bridge" in flags:
        folder = next(p for p in out.iterdir() if p.is_dir())
        return load_rank_file(folder / "common.pt")["args"]
    return load_rank_file(out / "release" / "mp_rank_00" / "model_optim_rng.pt")["args"]


@pytest.mark.parametrize("flags", [[], ["--format", "torch_dist"], ["--bridge"]])
def test_every_parse_args_field_is_written_with_the_models_values(flags, cli, tmp_path) -> None:
    hf = build_hf("qwen3", tmp_path / "hf", head_dim=24)
    args = vars(_written_args(cli, hf, tmp_path / "mg", *flags))
    table = megatron_lm_defaults()
    assert not set(table) - set(args)
    assert args["num_layers"] == 2 and args["hidden_size"] == 64 and args["kv_channels"] == 24
    assert args["swiglu"] is True and args["qk_layernorm"] is True and args["multi_latent_attention"] is False
    unset = {k for k in table if k not in ("num_layers", "hidden_size") and args[k] == table[k]}
    assert {"heterogeneous_layers_config_path", "cp_comm_type", "lr", "micro_batch_size"} <= unset


def _bridge_fallback_config(args):
    """Megatron-Bridge's `_transformer_config_from_args`, re-stated: every TransformerConfig field the args have,
    then its explicit translations (megatron-core builds and validates it)."""
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig
    cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    assert args.heterogeneous_layers_config_path is None
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw |= dict(persist_layer_norm=not args.no_persist_layer_norm, pipeline_dtype=args.params_dtype,
               batch_p2p_comm=not args.overlap_p2p_comm, num_moe_experts=args.num_experts,
               rotary_interleaved=args.rotary_interleaved, fp8_param=args.fp8_param_gather,
               num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
               num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
               num_query_groups=args.num_query_groups if args.group_query_attention else None,
               config_logger_dir=args.config_logger_dir, deallocate_pipeline_outputs=True)
    if args.swiglu:
        kw |= dict(activation_func=F.silu, gated_linear_unit=True, bias_activation_fusion=args.bias_swiglu_fusion)
    else:
        kw["bias_activation_fusion"] = args.bias_gelu_fusion
    if len(args.cp_comm_type) == 1:
        kw["cp_comm_type"] = args.cp_comm_type[0]
    # this CPU has no Transformer Engine, whose rope fusion Megatron-LM's defaults turn on (as a GPU run would)
    return cls(**{**kw, "use_cpu_initialization": True, "apply_rope_fusion": False})


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_bridges_fallback_builds_a_transformer_config_from_the_args(name, cli, tmp_path) -> None:
    pytest.importorskip("megatron.core")
    build, _ = SOURCES[name]
    args = _written_args(cli, build(tmp_path / "hf"), tmp_path / "mg", "--format", "torch_dist")
    for field in BRIDGE_READS:
        assert hasattr(args, field), field
    cfg = _bridge_fallback_config(args)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_moe_experts) == (args.num_layers, args.hidden_size,
                                                                      args.num_experts)
    assert cfg.params_dtype == torch.float32 and cfg.pipeline_dtype == torch.float32
    if name == "deepseek_v3":
        assert (cfg.kv_lora_rank, cfg.q_lora_rank) == (args.kv_lora_rank, args.q_lora_rank)
