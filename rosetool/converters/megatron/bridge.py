"""Megatron-Bridge checkpoints: the model's shape from `run_config.yaml`, read as data.

Bridge saves torch_dist tensors without a `common.pt` or Megatron-LM `args`; the model lives only in
the `model:` section of `run_config.yaml`, a dump of its model provider (a megatron-core
`TransformerConfig` plus Bridge fields). Every object there is a mapping with `_target_` naming a
class or function, which Bridge imports. rosetool never does: the file is read with
`yaml.safe_load`, and `_target_` is only compared with the names megatron-core and Bridge use.

The provider's fields are translated to the Megatron-LM `args` names the rest of the Megatron
reader understands, so Bridge and Megatron-LM checkpoints go through one config path. A field that
changes the math and has no mapping is refused by name rather than dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ...errors import CheckpointError

RUN_CONFIG = "run_config.yaml"
PROVIDER_PREFIX = "megatron.bridge.models."
NEMO_CONFIG = ("context", "model.yaml")    # NeMo 2: CKPT/weights/ (torch_dist) + CKPT/context/model.yaml
NEMO_PREFIX = "nemo.collections.llm."
# providers of models that are not one GPTModel decoder (hybrid Mamba, encoder-decoder, vision-language)
_OTHER_MODELS = ("mamba", "hybrid", "nemotronh", "t5", "bert", "vl", "vision", "omni", "audio", "llava", "mimo")
# activation `_target_`s as Bridge's YAML representer names them (F.gelu is a C function: its module is torch._C._nn)
_GELU = {"torch.nn.functional.gelu", "torch._C._nn.gelu"}
_GELU_TANH = {"megatron.core.activations.fast_gelu", "megatron.core.fusions.fused_bias_gelu.openai_gelu",
              "megatron.core.activations.openai_gelu"}
_SILU = {"torch.nn.functional.silu", "torch._C._nn.silu"}
_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}

# provider fields with the same name and meaning as Megatron-LM's args
_SAME = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "normalization",
         "layernorm_epsilon", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "rotary_base", "rotary_percent",
         "rotary_interleaved", "rope_scaling_factor", "window_size", "make_vocab_size_divisible_by",
         "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
         "moe_layer_freq", "moe_router_pre_softmax", "moe_router_score_function", "moe_router_topk_scaling_factor",
         "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk",
         "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
         "rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
         "original_max_position_embeddings", "tensor_model_parallel_size", "pipeline_model_parallel_size",
         "expert_model_parallel_size", "expert_tensor_parallel_size")

# Provider fields that change the model's math and that rosetool does not map: the values that leave the
# model as rosetool builds it (the first is megatron-core 0.16's TransformerConfig default). Any other
# value is refused by name.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "softmax_type": ("vanilla",),                              # attention sinks (off-by-one, learnable)
    "qk_l2_norm": (False,),                                    # Llama-4's L2 q/k norm
    "apply_residual_connection_post_layernorm": (False,),
    "layernorm_zero_centered_gamma": (False,),                 # norm weight stored as (gamma - 1)
    "mtp_num_layers": (None, 0),                               # multi-token prediction layers (more tensors)
    "seq_len_interpolation_factor": (None, 1, 1.0),
    "moe_apply_probs_on_input": (False,),
    "moe_expert_capacity_factor": (None,),                     # token dropping
    "moe_latent_size": (None,),
    "experimental_attention_variant": (None,),                 # gated delta net and other linear attention
    "attention_output_gate": (False,),
    "glu_linear_offset": (0.0, 0),                             # GPT-OSS's clamped SwiGLU
    "activation_func_clamp_value": (None,),
    "is_hybrid_model": (False,),
    "heterogeneous_block_specs": (False,),
    "no_rope_freq": (None,),                                   # Llama-4's NoPE layers
    "embedding_multiplier": (None, 1, 1.0),
    "hybrid_override_pattern": (None,),
    "hybrid_layer_pattern": (None,),
}


@dataclass(frozen=True)
class RunConfig:
    """`run_config.yaml` as data: the provider's class name, its fields, and where they came from."""
    path: Path
    provider: str
    model: dict[str, Any]
    tokenizer: dict[str, Any] | None

    def info(self) -> dict[str, Any]:
        """What `inspect` shows: the provider, the parallel sizes it was saved at, where it came from."""
        m = self.model
        return {"provider": self.provider, "hf_model_id": m.get("hf_model_id"),
                "saved_parallel": {k: m.get(f"{k}_model_parallel_size") for k in ("tensor", "pipeline", "expert")}
                | {"expert_tensor": m.get("expert_tensor_parallel_size")},
                "transformer_layer_spec": target(m.get("transformer_layer_spec")), "run_config": str(self.path)}


def target(value: Any) -> str | None:
    """The dotted name in a `_target_` mapping (data, never imported), else None."""
    return value.get("_target_") if isinstance(value, Mapping) and isinstance(value.get("_target_"), str) else None


def read_run_config(path: Path, section: str = "model", prefix: str = PROVIDER_PREFIX,
                    what: str = "Megatron-Bridge model provider") -> RunConfig:
    """Parse with `yaml.safe_load` (no python/object tags, no `_target_` instantiation) and check the
    model section is a GPT model provider. NeMo 2's `context/model.yaml` holds the same fields (a
    megatron-core TransformerConfig subclass) under `config:`."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: not a {what} config ({reason})") from None
    model = data.get(section) if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no '{section}:' section (the {what} it saves)")
    provider = target(model)
    if not provider or not provider.startswith(prefix):
        raise CheckpointError(f"{path}: {section}._target_ {provider!r} is not a {what} ({prefix}*); "
                              f"rosetool reads the fields as data and imports nothing")
    name = provider.rsplit(".", 1)[-1].lower()
    if any(word in name for word in _OTHER_MODELS):
        raise CheckpointError(f"{path}: model provider {provider} is not a GPT decoder rosetool converts")
    tokenizer = data.get("tokenizer")
    return RunConfig(path, provider, model, tokenizer if isinstance(tokenizer, dict) else None)


def _activation(model: Mapping[str, Any], where: str) -> dict[str, bool]:
    """`gated_linear_unit` + `activation_func` -> Megatron-LM's --swiglu / --openai-gelu."""
    act = target(model.get("activation_func")) or "torch.nn.functional.gelu"
    gated = bool(model.get("gated_linear_unit", False))
    if gated and act in _SILU:
        return {"swiglu": True, "openai_gelu": False}
    if not gated and act in _GELU | _GELU_TANH:
        return {"swiglu": False, "openai_gelu": act in _GELU_TANH}
    raise CheckpointError(f"{where}: model.activation_func {act!r} with gated_linear_unit={gated} is not "
                          f"mapped (rosetool reads SwiGLU, GELU and tanh-GELU)")


def _refuse_unmapped(model: Mapping[str, Any], where: str) -> None:
    for name, neutral in NEUTRAL.items():
        value = model.get(name, neutral[0])
        if value not in neutral:
            raise CheckpointError(f"{where}: model.{name}={value!r} changes the model's math and rosetool "
                                  f"does not map it (it reads {neutral[0]!r})")
    position = model.get("position_embedding_type", "learned_absolute")
    if position not in ("rope", "learned_absolute"):
        raise CheckpointError(f"{where}: model.position_embedding_type={position!r} is not mapped "
                              f"(rosetool reads rope and learned_absolute)")
    if model.get("normalization", "LayerNorm") not in ("LayerNorm", "RMSNorm"):
        raise CheckpointError(f"{where}: model.normalization={model['normalization']!r} is not mapped")


def padded_vocab(model: Mapping[str, Any]) -> int:
    """Bridge pads the vocabulary only with `should_pad_vocab` (its HF import does not)."""
    vocab = int(model["vocab_size"])
    if not model.get("should_pad_vocab", False):
        return vocab
    step = int(model.get("make_vocab_size_divisible_by") or 128) * int(model.get("tensor_model_parallel_size") or 1)
    return -(-vocab // step) * step


def args_from_provider(model: Mapping[str, Any], where: str) -> argparse.Namespace:
    """The provider's fields under Megatron-LM's args names (what `args.spec_for_args` and
    `args.config_from_args` read); refuses what they could not say."""
    _refuse_unmapped(model, where)
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if model.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: model.{missing[0]} is missing; rosetool needs it for the model shape")
    heads = model["num_attention_heads"]
    groups = model.get("num_query_groups") or heads
    args = {k: model[k] for k in _SAME if model.get(k) is not None}
    mla = bool(model.get("multi_latent_attention"))
    if mla and float(model.get("rotary_scaling_factor") or 1.0) <= 1.0:
        args["rope_type"] = "rope"     # YaRN with factor <= 1 is plain rope (Bridge's MLA default when HF has none)
    args.update(
        _activation(model, where),
        num_experts=model.get("num_moe_experts"), num_query_groups=groups, group_query_attention=groups != heads,
        max_position_embeddings=model.get("seq_length"), seq_length=model.get("seq_length"),
        position_embedding_type="rope" if mla else model.get("position_embedding_type", "learned_absolute"),
        untie_embeddings_and_output_weights=not model.get("share_embeddings_and_output_weights", True),
        use_rope_scaling=bool(model.get("rope_scaling", False)),
        padded_vocab_size=padded_vocab(model), vocab_size=int(model["vocab_size"]),
        params_dtype=_DTYPES.get(target(model.get("params_dtype")) or "", "float32"),
        bf16=bool(model.get("bf16")), fp16=bool(model.get("fp16")))
    if mla:
        args.setdefault("kv_channels", model.get("v_head_dim"))
    return argparse.Namespace(**args)


# --- writing: Bridge's layout around rosetool's torch_dist tensors ------------------------------------------

GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
MLA_PROVIDER = "megatron.bridge.models.mla_provider.MLAModelProvider"
BRIDGE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
_GPT_SPEC = "megatron.bridge.models.gpt_provider."
_BLOCK_SPEC = "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec"


def _function(name: str) -> dict[str, Any]:
    """How Bridge's YAML representer writes a function or dtype: named, not called."""
    return {"_call_": False, "_target_": name}


def layer_spec(mla: bool, key_layout: str) -> dict[str, Any]:
    """The layer spec whose torch_dist names the tensors have. Dense layers key the same under both specs
    (the local spec maps its norms onto TE's names); an MoE layer's pre-MLP norm and MLA's q/kv norms do not."""
    te = key_layout != "megatron_dist_local" if mla else key_layout != "megatron_dist"
    if mla:    # what Bridge's DeepSeek bridges set: functools.partial of megatron-core's block spec
        return {"_target_": _BLOCK_SPEC, "_partial_": True, "_args_": [], "use_transformer_engine": te}
    return _function(_GPT_SPEC + ("default_layer_spec" if te else "local_layer_spec"))


def vocab_rows(vocab: int, tp: int) -> int:
    """Bridge's import leaves the vocabulary unpadded (`should_pad_vocab: false`); that needs it to split
    over TP, else it is padded as Megatron-LM pads it."""
    step = 128 * tp
    return vocab if vocab % tp == 0 else -(-vocab // step) * step


def provider_section(args: argparse.Namespace, vocab: int, key_layout: str, hf_model_id: str | None) -> dict[str, Any]:
    """The `model:` section Bridge's `AutoBridge` would write, from the Megatron-LM args rosetool derives from
    the canonical config (the inverse of `args_from_provider`, so what one writes the other reads)."""
    a = vars(args)
    mla = bool(a.get("multi_latent_attention"))
    activation = "torch.nn.functional.silu" if a["swiglu"] else \
        "megatron.core.activations.fast_gelu" if a.get("openai_gelu") else "torch.nn.functional.gelu"
    dtype = str(a["params_dtype"])
    model = {"_target_": MLA_PROVIDER if mla else GPT_PROVIDER,
             **{k: a[k] for k in _SAME if a.get(k) is not None},
             "num_query_groups": a["num_query_groups"], "seq_length": a["max_position_embeddings"],
             "vocab_size": vocab, "should_pad_vocab": a["padded_vocab_size"] != vocab,
             "share_embeddings_and_output_weights": not a["untie_embeddings_and_output_weights"],
             "position_embedding_type": a["position_embedding_type"], "rope_scaling": bool(a.get("use_rope_scaling")),
             "gated_linear_unit": bool(a["swiglu"]), "activation_func": _function(activation),
             "params_dtype": _function(dtype if dtype.startswith("torch.") else f"torch.{dtype}"),
             "bf16": bool(a.get("bf16")), "fp16": bool(a.get("fp16")), "hidden_dropout": 0.0,
             "attention_dropout": 0.0, "transformer_layer_spec": layer_spec(mla, key_layout),
             "hf_model_id": hf_model_id, "expert_tensor_parallel_size": a.get("expert_tensor_parallel_size") or a["tensor_model_parallel_size"]}
    if a.get("num_experts"):
        model |= {"num_moe_experts": a["num_experts"], "moe_grouped_gemm": bool(a.get("moe_grouped_gemm")),
                  "moe_token_dispatcher_type": a.get("moe_token_dispatcher_type", "alltoall")}
    if mla:
        model |= {"kv_channels": a["v_head_dim"], "rope_type": a["rope_type"]}   # the local core attention's width
    return model


def run_config(model: dict[str, Any]) -> dict[str, Any]:
    """The ConfigContainer Bridge's `save_megatron_model` dumps: the model, and a checkpoint section saying no
    optimizer or RNG state was saved (Bridge's loader reads those flags before it loads)."""
    return {"_target_": "megatron.bridge.training.config.ConfigContainer",
            "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "async_save": False,
                           "ckpt_format": "torch_dist", "save": None, "save_optim": False, "save_rng": False,
                           "fully_parallel_save": True, "dist_ckpt_optim_fully_reshardable": True},
            "dataset": None, "ddp": None, "dist": None, "model": model, "scheduler": None, "train": None,
            "tokenizer": None if model.get("hf_model_id") is None else
            {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
             "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": model["hf_model_id"],
             "hf_tokenizer_kwargs": {}}}


def write_run_config(folder: Path, model: dict[str, Any]) -> None:
    (folder / RUN_CONFIG).write_text(yaml.safe_dump(run_config(model), sort_keys=True))
