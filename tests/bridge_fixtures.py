"""Checkpoints in the layout Megatron-Bridge 0.6 writes, built here from the facts, without Bridge.

`CKPT/latest_checkpointed_iteration.txt` ("0"), `latest_train_state.pt`, and `iter_0000000/` with the torch_dist
files, a `metadata.json` of the sharded backend only, `train_state.pt`, `tokenizer/` and `run_config.yaml` -- and
no `common.pt`. The `model:` section is made the way Bridge's `provider_bridge` makes it from an HF config.json
(its CONFIG_MAPPING, then the family's own settings), dumped the way its YAML representer dumps objects:
`{_target_: dotted.name, _call_: false}` for functions and dtypes, `_partial_` for functools.partial. Every other
TransformerConfig field is present with megatron-core's default, as in a real dump.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from rosetool.converters.api import convert
from rosetool.converters.megatron import Layout, make_writer

SILU = {"_call_": False, "_target_": "torch.nn.functional.silu"}
SPECS = {   # (family, layer spec) -> transformer_layer_spec as Bridge dumps it
    ("gpt", "te"): {"_call_": False, "_target_": "megatron.bridge.models.gpt_provider.default_layer_spec"},
    ("gpt", "local"): {"_call_": False, "_target_": "megatron.bridge.models.gpt_provider.local_layer_spec"},
    **{("mla", s): {"_target_": "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec",
                    "_partial_": True, "_args_": [], "use_transformer_engine": s == "te"} for s in ("te", "local")},
}
# rosetool key layout that holds each (family, layer spec)'s torch_dist names
LAYOUTS = {("qwen3", "te"): "megatron_te", ("qwen3", "local"): "megatron_te",    # local keys map onto TE's names
           ("qwen3_moe", "te"): "megatron_dist_te", ("qwen3_moe", "local"): "megatron_dist",
           ("deepseek_v3", "te"): "megatron_dist", ("deepseek_v3", "local"): "megatron_dist_local"}
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}\n',
             "tokenizer_config.json": '{"tokenizer_class": "PreTrainedTokenizerFast"}\n'}


def _represent(value: Any) -> Any:
    """Bridge's safe representers, for the values a TransformerConfig default can hold."""
    if isinstance(value, torch.dtype):
        return {"_call_": False, "_target_": str(value)}
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", "_call_": True, "_args_": [value.value],
                "_name_": value.name}
    if callable(value):
        return {"_call_": False, "_target_": f"{getattr(value, '__module__', None)}.{value.__qualname__}"}
    if isinstance(value, (list, tuple)):
        return [_represent(v) for v in value]
    if isinstance(value, dict):
        return {k: _represent(v) for k, v in value.items()}
    return value


def config_defaults(mla: bool) -> dict[str, Any]:
    """megatron-core's TransformerConfig (or MLATransformerConfig) field defaults, as a dump holds them."""
    try:
        from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
    except ImportError:
        return {}
    out = {}
    for f in dataclasses.fields(MLATransformerConfig if mla else TransformerConfig):
        if f.name.startswith("_"):
            continue
        value = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        out[f.name] = _represent(value)
    return out


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope theta and scaling from either spelling (transformers 5 writes rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0), scaling


def model_section(hf: dict[str, Any], layout: Layout, spec: str, etp: int | None = None) -> dict[str, Any]:
    """The provider Bridge builds for Qwen3, Qwen3-MoE and DeepSeek-V3 (megatron-bridge 0.6 provider_bridge)."""
    kind = hf["model_type"]
    mla = kind == "deepseek_v3"
    theta, scaling = _rope(hf)
    vocab = hf["vocab_size"]
    m = {**config_defaults(mla),
         "_target_": "megatron.bridge.models.mla_provider.MLAModelProvider" if mla
         else "megatron.bridge.models.gpt_provider.GPTModelProvider",
         "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
         "ffn_hidden_size": hf["intermediate_size"], "num_attention_heads": hf["num_attention_heads"],
         "num_query_groups": hf["num_key_value_heads"], "kv_channels": hf.get("head_dim"), "vocab_size": vocab,
         "seq_length": hf["max_position_embeddings"], "layernorm_epsilon": hf["rms_norm_eps"],
         "init_method_std": hf.get("initializer_range", 0.02), "attention_dropout": hf.get("attention_dropout", 0.0),
         "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings")),
         "add_qkv_bias": bool(hf.get("attention_bias")), "rotary_base": theta,
         "make_vocab_size_divisible_by": max(d for d in (1, 2, 4, 8, 16, 32, 64, 128) if vocab % d == 0),
         "should_pad_vocab": False, "fp16": False, "bf16": False,
         "params_dtype": {"_call_": False, "_target_": "torch.float32"}, "activation_func": SILU,
         "position_embedding_type": "rope", "normalization": "RMSNorm", "gated_linear_unit": True,
         "add_bias_linear": False, "hidden_dropout": 0.0, "qk_layernorm": True,
         "autocast_dtype": {"_call_": False, "_target_": "torch.bfloat16"},
         "tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
         "expert_model_parallel_size": layout.ep, "expert_tensor_parallel_size": etp or layout.tp,
         "transformer_layer_spec": SPECS[("mla" if mla else "gpt", spec)],
         "hf_model_id": "/lustre/fsw/models/" + kind, "hf_model_revision": None, "parallel_output": True,
         "fp16_lm_cross_entropy": False, "rotary_percent": 1.0, "rope_scaling": False, "rope_scaling_factor": 1.0,
         "seq_len_interpolation_factor": None, "use_transformer_engine_full_layer_spec": False}
    experts = hf.get("num_experts") or hf.get("num_local_experts") or hf.get("n_routed_experts")
    if experts:
        m |= {"num_moe_experts": experts, "moe_router_topk": hf["num_experts_per_tok"],
              "moe_ffn_hidden_size": hf["moe_intermediate_size"], "moe_grouped_gemm": True,
              "moe_token_dispatcher_type": "alltoall", "moe_permute_fusion": True}
    if kind == "qwen3_moe":
        m |= {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-3,
              "moe_router_pre_softmax": not hf["norm_topk_prob"]}
    if mla:
        dense = hf["first_k_dense_replace"]
        m |= {"q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"],
              "qk_head_dim": hf["qk_nope_head_dim"], "qk_pos_emb_head_dim": hf["qk_rope_head_dim"],
              "v_head_dim": hf["v_head_dim"], "multi_latent_attention": True, "moe_router_pre_softmax": True,
              "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
              "moe_router_dtype": "fp32", "moe_router_load_balancing_type": "seq_aux_loss",
              "moe_router_num_groups": hf.get("n_group"), "moe_router_group_topk": hf.get("topk_group"),
              "moe_router_topk_scaling_factor": hf.get("routed_scaling_factor"),
              "make_vocab_size_divisible_by": 1280, "share_embeddings_and_output_weights": False,
              "moe_layer_freq": [0] * dense + [1] * (hf["num_hidden_layers"] - dense),
              "moe_shared_expert_intermediate_size": hf["moe_intermediate_size"] * hf["n_shared_experts"],
              "mtp_num_layers": hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or None, "moe_shared_expert_overlap": True}
        if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
            m |= {"rotary_scaling_factor": scaling["factor"], "beta_fast": scaling["beta_fast"],
                  "beta_slow": scaling["beta_slow"], "mscale": scaling["mscale"],
                  "mscale_all_dim": scaling["mscale_all_dim"],
                  "original_max_position_embeddings": scaling["original_max_position_embeddings"]}
        else:
            m |= {"rotary_scaling_factor": 1.0, "mscale_all_dim": 1.0}
    return m


def run_config(model: dict[str, Any], save: str = "/results/ckpt") -> dict[str, Any]:
    """The whole ConfigContainer dump `save_megatron_model` writes: model, checkpoint, logger, tokenizer, ..."""
    return {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "async_save": False,
                       "ckpt_format": "torch_dist", "save": save, "save_optim": False, "save_rng": False,
                       "fully_parallel_save": True, "dist_ckpt_optim_fully_reshardable": True},
        "dataset": None, "ddp": None, "dist": None,
        "logger": {"_target_": "megatron.bridge.training.config.LoggerConfig", "log_interval": 100},
        "model": model,
        "optimizer": {"_target_": "megatron.bridge.training.config.OptimizerConfig",
                      "use_distributed_optimizer": False, "params_dtype": {"_call_": False,
                                                                          "_target_": "torch.float32"}},
        "rng": {"_target_": "megatron.bridge.training.config.RNGConfig", "seed": 1234},
        "scheduler": None,
        "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                      "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": model["hf_model_id"],
                      "hf_tokenizer_kwargs": {}},
        "train": None,
    }


def _train_state() -> dict[str, torch.Tensor]:
    return {"step": torch.tensor(0), "consumed_train_samples": torch.tensor(0),
            "skipped_train_samples": torch.tensor(0), "consumed_valid_samples": torch.tensor(0),
            "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
            "do_train": torch.tensor(False), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}


def to_bridge_layout(ckpt: Path, folder: Path, model: dict[str, Any], tokenizer: bool = True) -> Path:
    """Turn a torch_dist folder `folder` (tensors only are kept) into Bridge's CKPT/iter_0000000/ under `ckpt`."""
    it = ckpt / "iter_0000000"
    it.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name == ".metadata" or f.suffix == ".distcp":
            shutil.copy2(f, it / f.name)
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    (it / "run_config.yaml").write_text(yaml.safe_dump(run_config(model, str(ckpt))))
    torch.save(_train_state(), it / "train_state.pt")
    shutil.copy2(it / "train_state.pt", ckpt / "latest_train_state.pt")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    if tokenizer:
        (it / "tokenizer").mkdir()
        for name, text in TOKENIZER.items():
            (it / "tokenizer" / name).write_text(text)
    return ckpt


def bridge_checkpoint(hf: Path, ckpt: Path, layout: Layout, spec: str = "te", **model_changes: Any) -> Path:
    """An HF folder as Megatron-Bridge would import it: its tensors (rosetool's torch_dist writer, the vocabulary
    left unpadded as Bridge leaves it) in Bridge's layout, with Bridge's run config."""
    config = json.loads((hf / "config.json").read_text())
    fmt = LAYOUTS[(config["model_type"], spec)]
    tmp = ckpt.parent / (ckpt.name + ".tensors")
    convert(hf, tmp, fmt, params={"tensor_parallel": layout.tp, "padded_vocab_size": config["vocab_size"]},
            writer=make_writer(layout, ckpt_format="torch_dist"))
    model = {**model_section(config, layout, spec), **model_changes}
    to_bridge_layout(ckpt, tmp / "release", model)
    shutil.rmtree(tmp)
    return ckpt


def _prefix_keys(metadata: Path, prefix: str) -> None:
    """Rename every entry of a torch_dist `.metadata` (test code reading its own file): the data files locate
    tensors by the offsets stored there, not by name."""
    import pickle
    from dataclasses import replace
    md = pickle.loads(metadata.read_bytes())
    md.state_dict_metadata = {prefix + k: v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {replace(k, fqn=prefix + k.fqn): v for k, v in md.storage_data.items()}
    metadata.write_bytes(pickle.dumps(md))


def nemo2_checkpoint(hf: Path, ckpt: Path) -> Path:
    """NeMo 2's layout: `weights/` (torch_dist, every key under the wrapper's `module.`, vocabulary padded to 128,
    a common.pt without args) and `context/model.yaml` whose `config:` holds the TransformerConfig fields."""
    config = json.loads((hf / "config.json").read_text())
    tmp = ckpt.parent / (ckpt.name + ".tensors")
    convert(hf, tmp, LAYOUTS[(config["model_type"], "te")], writer=make_writer(ckpt_format="torch_dist"))
    (ckpt / "context" / "nemo_tokenizer").mkdir(parents=True)
    shutil.copytree(tmp / "release", ckpt / "weights")
    shutil.rmtree(tmp)
    torch.save({"checkpoint_version": 3.0}, ckpt / "weights" / "common.pt")
    _prefix_keys(ckpt / "weights" / ".metadata", "module.")
    family = config["model_type"].replace("_", "")
    section = {k: v for k, v in model_section(config, Layout(), "te").items() if k not in ("hf_model_id",
                                                                                           "should_pad_vocab")}
    section |= {"_target_": f"nemo.collections.llm.gpt.model.{family}.{family.capitalize()}Config",
                "make_vocab_size_divisible_by": 128}    # NeMo's GPTConfig default; it always pads
    (ckpt / "context" / "model.yaml").write_text(yaml.safe_dump({
        "_target_": f"nemo.collections.llm.gpt.model.{family}.{family.capitalize()}Model", "config": section,
        "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                      "pretrained_model_name": "nemo_tokenizer"}}))
    (ckpt / "context" / "io.json").write_text("{}")
    for name, text in TOKENIZER.items():
        (ckpt / "context" / "nemo_tokenizer" / name).write_text(text)
    return ckpt
