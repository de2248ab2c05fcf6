"""Config translation: a format's config dict <-> canonical config (rosetool.canonical.ModelArgs fields).

Driven by the `config` section of each format in a spec. Fields no table can express (HF's two RoPE
spellings) go through a named codec here. Unknown fields are reported; fields a spec marks
`unsupported` (because they change the math in a way the runtime does not implement) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..canonical import ModelArgs
from ..errors import RosetoolError
from ..mappings import expr
from ..mappings.spec import ArchSpec, FieldMap, Format, default_expr

# Keys every HF config may carry that never change a forward pass.
HF_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "use_cache", "initializer_range", "pad_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "tokenizer_class", "task_specific_params", "attention_dropout", "hidden_dropout",
    "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
    "prefix", "sep_token_id", "decoder_start_token_id", "finetuning_task", "tie_encoder_decoder",
    "pretraining_tp", "max_window_layers", "layer_types", "_attn_implementation_autoset", "auto_map",
})


@dataclass(frozen=True)
class Codec:
    keys: tuple[str, ...]
    read: Callable[[Mapping[str, Any]], Any]
    write: Callable[[Any], dict[str, Any]]


def _rope_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 nests RoPE settings in `rope_parameters`; 4.x used top-level fields."""
    params = dict(raw.get("rope_parameters") or {})
    if raw.get("rope_scaling"):
        params.update(raw["rope_scaling"])
    if raw.get("rope_theta") is not None:
        params["rope_theta"] = raw["rope_theta"]
    return params


def _read_rope_scaling(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    params = {k: v for k, v in _rope_params(raw).items() if k != "rope_theta"}
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


def _read_mlp_only_layers(raw: Mapping[str, Any]) -> list[int]:
    """Qwen-MoE: a layer is dense if listed, or if (i + 1) is not a multiple of decoder_sparse_step;
    both fold into the one canonical list."""
    step = raw.get("decoder_sparse_step") or 1
    every = range(raw.get("num_hidden_layers") or 0)
    return sorted(set(raw.get("mlp_only_layers") or ()) | {i for i in every if (i + 1) % step})


CODECS: dict[str, Codec] = {
    "hf_rope_theta": Codec(("rope_theta", "rope_parameters"),
                           lambda raw: float(_rope_params(raw).get("rope_theta", 10000.0)), _write_rope_theta),
    "hf_rope_scaling": Codec(("rope_scaling", "rope_parameters"), _read_rope_scaling, _write_rope_scaling),
    "hf_mlp_only_layers": Codec(("mlp_only_layers", "decoder_sparse_step"), _read_mlp_only_layers,
                                lambda layers: {"mlp_only_layers": list(layers), "decoder_sparse_step": 1}),
    # transformers 5 saves Qwen3-MoE's expert count as num_local_experts; the hub spells it num_experts
    "hf_num_experts": Codec(("num_experts", "num_local_experts"),
                            lambda raw: raw.get("num_experts") or raw.get("num_local_experts"),
                            lambda n: {"num_experts": n}),
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
_OPTIONAL = frozenset({"rope_theta", "rope_scaling", "sliding_window", "bos_token_id", "eos_token_id"})


def _read_field(f: FieldMap, raw: Mapping[str, Any], where: str) -> Any:
    if f.codec:
        return CODECS[f.codec].read(raw)
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


def read_config(spec: ArchSpec, fmt: Format, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Format config -> canonical config; refuses settings the runtime cannot run, by name."""
    cfg = _read_config(spec, fmt, raw, where)
    try:
        ModelArgs.from_dict(cfg)   # the canonical config is the runtime's: what it refuses, we refuse
    except RosetoolError as exc:
        raise RosetoolError(f"{where}: {exc}") from None
    return cfg


def _read_config(spec: ArchSpec, fmt: Format, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    check_supported(fmt, raw, where)
    if fmt.config is None:
        return _resolve_defaults(spec, dict(raw), where)
    cfg: dict[str, Any] = {}
    for f in fmt.config:
        cfg[f.canonical] = _read_field(f, raw, where)
    deferred = {k: v.source for k, v in cfg.items() if isinstance(v, _Deferred)}
    for k in deferred:
        cfg[k] = None
    for k, src in deferred.items():
        known = {n: v for n, v in {**_constants(spec), **cfg}.items() if v is not None}
        cfg[k] = expr.evaluate(src, known)
    return _resolve_defaults(spec, cfg, where)


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
            for k, v in CODECS[f.codec].write(value).items():   # codecs may share a nested field
                out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        elif f.key is not None and value is not None:
            if f.map is not None:
                value = next(k for k, v in f.map.items() if v == value)
            out[f.key] = value
    return out
