"""Config translation: a format's config dict <-> canonical config (rosetool.canonical.ModelArgs fields).

Driven by the `config` section of each format in a spec. Fields no table can express (HF's two RoPE
spellings) go through a named codec here. Unknown fields are reported; fields a spec marks
`unsupported` (because they change the math in a way the runtime does not implement) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..canonical import ModelArgs, check_fields
from ..errors import RosetoolError
from ..mappings import expr
from ..mappings.spec import ArchSpec, FieldMap, Format, default_expr
from .counts import check_layer_count

# Keys every HF config may carry that never change a forward pass.
HF_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "initializer_range", "pad_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "tokenizer_class", "task_specific_params", "attention_dropout", "hidden_dropout",
    "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
    "prefix", "sep_token_id", "decoder_start_token_id", "finetuning_task", "tie_encoder_decoder",
    "pretraining_tp", "max_window_layers", "layer_types", "_attn_implementation_autoset", "auto_map",
    "quantization_config",   # read by the quantization layer (rosetool.converters.quant), not the spec
})


@dataclass(frozen=True)
class Codec:
    keys: tuple[str, ...]
    read: Callable[[Mapping[str, Any]], Any]
    write: Callable[[Any, Mapping[str, Any]], dict[str, Any]]   # (value, whole canonical config)


def _rope_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 nests RoPE settings in `rope_parameters`; 4.x used top-level fields."""
    params = dict(raw.get("rope_parameters") or {})
    if raw.get("rope_scaling"):
        params.update(raw["rope_scaling"])
    if raw.get("rope_theta") is not None:
        params["rope_theta"] = raw["rope_theta"]
    return params


def _read_rope_scaling(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    params = {k: v for k, v in _rope_params(raw).items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = params.pop("rope_type", None) or params.pop("type", None)
    params.pop("type", None)
    return None if kind in (None, "default") else {"rope_type": kind, **params}


def transformers_major() -> int:
    """The installed transformers' major version, from package metadata (importing it costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 5


def _write_rope_theta(theta: float) -> dict[str, Any]:
    if transformers_major() >= 5:
        return {"rope_parameters": {"rope_theta": theta, "rope_type": "default"}}
    return {"rope_theta": theta}


def _write_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any]:
    if not scaling:
        return {}
    if transformers_major() >= 5:
        return {"rope_parameters": dict(scaling)}
    return {"rope_scaling": dict(scaling)}


def _partial_rotary(legacy_key: str) -> Codec:
    """HF's partial rotary fraction: `rope_parameters.partial_rotary_factor` in transformers 5, a top-level
    `legacy_key` in 4.x. Absent: None, so the spec's family default applies."""
    def read(raw: Mapping[str, Any]) -> float | None:
        return _rope_params(raw).get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get(legacy_key)))

    def write(factor: float, cfg: Mapping[str, Any]) -> dict[str, Any]:
        if transformers_major() >= 5:
            return {"rope_parameters": {"partial_rotary_factor": factor}}
        return {legacy_key: factor}
    return Codec(("rope_parameters", "partial_rotary_factor", legacy_key), read, write)


def _read_gptj_rotary(raw: Mapping[str, Any]) -> float:
    """GPT-J gives a dim count; the factor must give it back through HF's int(head_dim * factor)."""
    rot, head_dim = raw["rotary_dim"], raw["n_embd"] // raw["n_head"]
    factor = rot / head_dim
    return math.nextafter(factor, math.inf) if int(head_dim * factor) < rot else factor   # e.g. 22 * (14 / 22)


def _explicit(key: str) -> Codec:
    """A field written even when null: where transformers' default is not null (Gemma 2's soft-caps and
    window), leaving it out would switch the feature on."""
    return Codec((key,), lambda raw: raw.get(key), lambda value, cfg: {key: value})


def _gemma3_rope(raw: Mapping[str, Any], layer_type: str) -> dict[str, Any]:
    """Gemma 3 nests RoPE per layer type in transformers 5; 4.x used rope_theta, rope_scaling (full layers)
    and rope_local_base_freq (windowed layers)."""
    nested = (raw.get("rope_parameters") or {}).get(layer_type)
    if nested is not None:
        return dict(nested)
    if layer_type == "sliding_attention":
        return {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    return {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", 1000000.0)}


def _read_gemma3_local_theta(raw: Mapping[str, Any]) -> float:
    local = _gemma3_rope(raw, "sliding_attention")
    if local.get("rope_type", "default") != "default":
        raise RosetoolError(f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r} "
                            f"(scaled RoPE on windowed layers) is not implemented")
    return float(local["rope_theta"])


def _write_gemma3_rope(scaling: dict[str, Any] | None, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The whole of Gemma 3's RoPE, written by the scaling field (it needs both bases)."""
    full = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg["rope_theta"]}
    if transformers_major() >= 5:
        return {"rope_parameters": {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg["rope_local_theta"]}}}
    return {"rope_theta": cfg["rope_theta"], "rope_local_base_freq": cfg["rope_local_theta"],
            **({"rope_scaling": dict(scaling)} if scaling else {})}


def _read_mlp_only_layers(raw: Mapping[str, Any]) -> list[int]:
    """Qwen-MoE: a layer is dense if listed, or if (i + 1) is not a multiple of decoder_sparse_step;
    both fold into the one canonical list."""
    step = raw.get("decoder_sparse_step") or 1
    every = range(raw.get("num_hidden_layers") or 0)
    return sorted(set(raw.get("mlp_only_layers") or ()) | {i for i in every if (i + 1) % step})


def _read_first_k_dense(raw: Mapping[str, Any]) -> list[int]:
    return list(range(min(raw.get("first_k_dense_replace") or 0, raw.get("num_hidden_layers") or 0)))


def _write_first_k_dense(layers: list[int], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek can only say "the first k layers are dense"; other patterns (Megatron's moe_layer_freq) cannot be written."""
    if list(layers) != list(range(len(layers))):
        raise RosetoolError(f"dense layers {list(layers)} are not the first k layers: DeepSeek's "
                            f"first_k_dense_replace cannot express them")
    return {"first_k_dense_replace": len(layers)}


def _write_n_shared(size: int, cfg: Mapping[str, Any]) -> dict[str, Any]:
    count, rest = divmod(size, cfg["moe_intermediate_size"])
    if rest:
        raise RosetoolError(f"shared expert width {size} is not a multiple of moe_intermediate_size="
                            f"{cfg['moe_intermediate_size']}: DeepSeek's n_shared_experts cannot express it")
    return {"n_shared_experts": count}


def _v2_groups(key: str) -> Codec:
    """DeepSeek-V2 limits experts to groups only with topk_method group_limited_greedy; greedy is one group."""
    def read(raw: Mapping[str, Any]) -> int:
        method = raw.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise RosetoolError(f"topk_method={method!r} is not implemented for DeepSeek-V2")
        return (raw.get(key) or 1) if method == "group_limited_greedy" else 1

    def write(value: int, cfg: Mapping[str, Any]) -> dict[str, Any]:
        grouped = cfg["expert_groups"] > 1
        return {"topk_method": "group_limited_greedy" if grouped else "greedy", key: value if grouped else None}
    return Codec((key, "topk_method"), read, write)


CODECS: dict[str, Codec] = {
    "hf_rope_theta": Codec(("rope_theta", "rope_parameters"),
                           lambda raw: float(_rope_params(raw).get("rope_theta", 10000.0)),
                           lambda theta, cfg: _write_rope_theta(theta)),
    "hf_rope_scaling": Codec(("rope_scaling", "rope_parameters"), _read_rope_scaling,
                             lambda scaling, cfg: _write_rope_scaling(scaling)),
    "hf_partial_rotary": _partial_rotary("partial_rotary_factor"),   # Phi, Phi-3
    "hf_rotary_pct": _partial_rotary("rotary_pct"),                  # GPT-NeoX
    "hf_gptj_rotary_dim": Codec(("rotary_dim",), _read_gptj_rotary,
                                lambda factor, cfg: {"rotary_dim": int(cfg["head_dim"] * factor)}),
    # Gemma 2: 4.x configs give no layer_types and mean windowed even layers, full odd ones (0-based)
    "hf_alternating_layer_types": Codec(("layer_types",), lambda raw: raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(raw["num_hidden_layers"])],
        lambda layer_types, cfg: {"layer_types": layer_types}),
    "hf_attn_logit_softcapping": _explicit("attn_logit_softcapping"),
    "hf_final_logit_softcapping": _explicit("final_logit_softcapping"),
    "hf_sliding_window": _explicit("sliding_window"),
    "hf_q_lora_rank": _explicit("q_lora_rank"),   # DeepSeek: transformers' default is 1536, not "no q LoRA"
    "hf_gemma3_rope_theta": Codec(("rope_parameters", "rope_theta"),
                                  lambda raw: float(_gemma3_rope(raw, "full_attention")["rope_theta"]),
                                  lambda theta, cfg: {}),
    "hf_gemma3_rope_local_theta": Codec(("rope_parameters", "rope_local_base_freq"), _read_gemma3_local_theta,
                                        lambda theta, cfg: {}),
    "hf_gemma3_rope_scaling": Codec(("rope_parameters", "rope_scaling"),
                                    lambda raw: _read_rope_scaling({"rope_parameters": _gemma3_rope(raw, "full_attention")}),
                                    _write_gemma3_rope),
    # Gemma 3: 4.x configs give sliding_window_pattern (every n-th layer full) instead of layer_types
    "hf_gemma3_layer_types": Codec(("layer_types", "sliding_window_pattern"), lambda raw: raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % raw.get("sliding_window_pattern", 6) else "full_attention"
        for i in range(raw["num_hidden_layers"])], lambda layer_types, cfg: {"layer_types": layer_types}),
    "hf_mlp_only_layers": Codec(("mlp_only_layers", "decoder_sparse_step"), _read_mlp_only_layers,
                                lambda layers, cfg: {"mlp_only_layers": list(layers), "decoder_sparse_step": 1}),
    # DeepSeek: a q/k head is qk_nope_head_dim + qk_rope_head_dim wide (HF's own head_dim is the rope part)
    "hf_mla_head_dim": Codec(("qk_nope_head_dim",), lambda raw: raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"],
                             lambda dim, cfg: {"qk_nope_head_dim": dim - cfg["qk_rope_head_dim"]}),
    "hf_first_k_dense_replace": Codec(("first_k_dense_replace",), _read_first_k_dense, _write_first_k_dense),
    "hf_n_shared_experts": Codec(("n_shared_experts",),
                                 lambda raw: (raw.get("n_shared_experts") or 0) * raw["moe_intermediate_size"],
                                 _write_n_shared),
    "hf_v2_expert_groups": _v2_groups("n_group"),
    "hf_v2_topk_groups": _v2_groups("topk_group"),
    # transformers 5 saves Qwen3-MoE's expert count as num_local_experts; the hub spells it num_experts
    "hf_num_experts": Codec(("num_experts", "num_local_experts"),
                            lambda raw: raw.get("num_experts") or raw.get("num_local_experts"),
                            lambda n, cfg: {"num_experts": n}),
}


def _resolve_defaults(spec: ArchSpec, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill fields the format did not give from the spec's defaults (`= expr` ones after constants)."""
    pending = [k for k in spec.config if cfg.get(k) is None and spec.config[k] is not None]
    for name in pending:
        if default_expr(spec.config[name]) is None:
            cfg[name] = spec.config[name]
    for _ in range(len(pending)):
        for name in pending:
            src = default_expr(spec.config[name])
            if src is not None and cfg.get(name) is None and expr.names(src) <= {k for k, v in cfg.items() if v is not None}:
                cfg[name] = expr.evaluate(src, cfg)
    required = [k for k in spec.config if spec.config[k] is None and k not in _OPTIONAL]
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise RosetoolError(f"{where}: config lacks required field(s) {missing} for {spec.name}")
    return {k: cfg.get(k) for k in spec.config}


# Canonical fields whose `null` default means "absent", not "required".
_OPTIONAL = frozenset({"rope_theta", "rope_scaling", "sliding_window", "bos_token_id", "eos_token_id",
                       "kv_lora_rank", "q_lora_rank", "v_head_dim", "query_pre_attn_scalar", "attn_softcap", "final_softcap", "layer_types", "rope_local_theta"})


def _read_field(f: FieldMap, raw: Mapping[str, Any], where: str) -> Any:
    if f.codec:
        try:
            return CODECS[f.codec].read(raw)
        except RosetoolError as exc:
            raise RosetoolError(f"{where}: unsupported config: {exc}") from None
    if f.key is None or raw.get(f.key) is None:
        if f.value is not None:
            return f.value
        src = default_expr(f.default)
        return f.default if src is None else _Deferred(src)
    value = raw[f.key]
    if f.map is not None:
        if value not in f.map:
            raise RosetoolError(f"{where}: unsupported {f.key}={value!r} (supported: {sorted(f.map)})")
        value = f.map[value]
    if f.value is not None and value != f.value:
        raise RosetoolError(f"{where}: unsupported {f.key}={value!r} (only {f.value!r} is implemented)")
    return value


@dataclass(frozen=True)
class _Deferred:
    """A default that depends on other canonical fields: evaluated once they are all read."""
    source: str


def read_config(spec: ArchSpec, fmt: Format, raw: Mapping[str, Any], where: str,
                tensor_count: int | None = None) -> dict[str, Any]:
    """Format config -> canonical config; refuses settings the runtime cannot run, by name.
    `tensor_count` (how many tensors the checkpoint holds) bounds num_layers before any codec builds a
    per-layer list from it."""
    cfg = _read_config(spec, fmt, raw, where, tensor_count)
    try:
        ModelArgs.from_dict(cfg)   # the canonical config is the runtime's: what it refuses, we refuse
    except RosetoolError as exc:
        raise RosetoolError(f"{where}: {exc}") from None
    return cfg


def _read_config(spec: ArchSpec, fmt: Format, raw: Mapping[str, Any], where: str,
                 tensor_count: int | None) -> dict[str, Any]:
    check_supported(fmt, raw, where)
    if fmt.config is None:
        _check_given(raw, where)
        check_layer_count(raw.get("num_layers"), tensor_count, where)
        return _resolve_defaults(spec, dict(raw), where)
    cfg: dict[str, Any] = {}
    plain = [f for f in fmt.config if not f.codec]   # codecs may build per-layer lists: plain fields first
    for f in plain:
        cfg[f.canonical] = _read_field(f, raw, where)
    _check_given({k: v for k, v in cfg.items() if not isinstance(v, _Deferred)}, where)
    check_layer_count(cfg.get("num_layers"), tensor_count, where)
    for f in fmt.config:
        if f.codec:
            cfg[f.canonical] = _read_field(f, raw, where)
    deferred = {k: v.source for k, v in cfg.items() if isinstance(v, _Deferred)}
    _check_given({k: v for k, v in cfg.items() if k not in deferred}, where)   # before defaults divide by them
    for k in deferred:
        cfg[k] = None
    for k, src in deferred.items():
        known = {n: v for n, v in {**_constants(spec), **cfg}.items() if v is not None}
        cfg[k] = expr.evaluate(src, known)
    return _resolve_defaults(spec, cfg, where)


def _check_given(cfg: Mapping[str, Any], where: str) -> None:
    try:
        check_fields({k: v for k, v in cfg.items() if v is not None})
    except RosetoolError as exc:
        raise RosetoolError(f"{where}: {exc}") from None


def _constants(spec: ArchSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.config.items() if v is not None and default_expr(v) is None}


def check_supported(fmt: Format, raw: Mapping[str, Any], where: str) -> None:
    for rule in fmt.unsupported:
        env = {name: raw.get(name) for name in expr.names(rule["when"])}   # absent fields read as null
        if expr.evaluate(rule["when"], env):
            raise RosetoolError(f"{where}: unsupported config: {rule['message']}")


def unknown_fields(fmt: Format, raw: Mapping[str, Any]) -> list[str]:
    """Config keys the spec neither maps nor knows to be harmless (shown by `inspect`, warned on convert)."""
    if fmt.config is None:
        return []
    known = set(fmt.inert) | HF_INERT
    for f in fmt.config:
        known.update(CODECS[f.codec].keys if f.codec else [f.key] if f.key else [])
    return sorted(k for k in raw if k not in known)


def write_config(fmt: Format, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical config -> the fields of a format's config (constants are implied, not written)."""
    if fmt.config is None:
        return dict(cfg)
    out: dict[str, Any] = {}
    for f in fmt.config:
        value = cfg[f.canonical]
        if f.codec:
            for k, v in CODECS[f.codec].write(value, cfg).items():   # codecs may share a nested field
                out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        elif f.key is not None and value is not None:
            if f.map is not None:
                value = next(k for k, v in f.map.items() if v == value)
            out[f.key] = value
    return out
