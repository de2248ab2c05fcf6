"""Mapping specs: one YAML file per architecture family, validated on load.

A spec names every canonical tensor (with its shape as expressions over canonical config fields) and,
for each format, which format tensor is made from which canonical tensors by which ops. Variants
(llama, mistral, qwen2, ...) deep-merge small overrides onto the family's base, so each
(variant, format) pair becomes one `ArchSpec` that the converter executes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import SpecError
from . import expr
from .ops import OP_BUILDERS

LAYER = "{i}"
EXPERT = "{e}"    # the second range: experts, `num_experts` of them
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when present: specs load in ms
_TOP_KEYS = {"name", "description", "architecture", "model_type", "config", "tensors", "formats", "variants", "refused"}
_FORMAT_KEYS = {"config", "tensors", "ignore", "inert", "unsupported", "params", "key_prefixes", "write", "unexpected"}
_ENTRY_KEYS = {"from", "ops", "when", "tp"}
_FIELD_KEYS = {"key", "default", "value", "map", "codec"}


@dataclass(frozen=True)
class FieldMap:
    """How one canonical config field is stored in a format's config."""
    canonical: str
    key: str | None = None
    default: Any = None
    value: Any = None           # a constant: the format always means this
    map: Mapping[Any, Any] | None = None   # format value -> canonical value
    codec: str | None = None    # a named reader/writer in code, for fields no table can express


@dataclass(frozen=True)
class Entry:
    """A format tensor `key` made from canonical tensors `sources` by `ops` (raw YAML, bound later)."""
    key: str
    sources: tuple[str, ...]
    ops: tuple[Any, ...] = ()
    when: str | None = None
    tp: Any = None


@dataclass(frozen=True)
class Format:
    name: str
    config: tuple[FieldMap, ...] | None      # None: the format stores canonical config as is
    entries: tuple[Entry, ...]
    ignore: tuple[Mapping[str, Any], ...] = ()
    inert: frozenset[str] = frozenset()
    unsupported: tuple[Mapping[str, str], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    key_prefixes: tuple[str, ...] = ()
    write: Mapping[str, Any] = field(default_factory=dict)
    # keys a source may hold that no entry maps, and what they are: {prefix: "model.layers.{num_layers}.",
    # message: ...} (config names in braces), so the refusal says why instead of just "unexpected tensor"
    unexpected: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[Any, ...]
    when: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """One architecture variant with every format it can be read from or written to."""
    name: str
    family: str
    file: str
    description: str
    architecture: str | None
    model_type: str | None
    config: Mapping[str, Any]          # canonical field -> default (None: required)
    tensors: tuple[Tensor, ...]
    formats: Mapping[str, Format]
    # format (or format family: `megatron` covers megatron_te, ...) -> why this architecture cannot have it
    refused: Mapping[str, str] = field(default_factory=dict)

    def format(self, name: str) -> Format:
        if name not in self.formats:
            reason = self.refused.get(name) or self.refused.get(name.split("_")[0])
            if reason:   # a known limit of the target, said in the user's terms rather than the spec's
                raise SpecError(f"{self.architecture or self.name} ({self.name}) cannot be written as {name}: {reason}")
            raise SpecError(f"{self.file}: architecture {self.name!r} has no {name!r} format")
        return self.formats[name]


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(over)


class _Checker:
    """Collects the location of each check so every error names file and entry."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, where: str, what: str) -> None:
        raise SpecError(f"{self.file}: {where}: {what}")

    def keys(self, where: str, got: Mapping[str, Any], allowed: set[str]) -> None:
        extra = set(got) - allowed
        if extra:
            self.fail(where, f"unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")

    def expression(self, where: str, source: Any, known: set[str]) -> None:
        if not isinstance(source, str):
            return
        try:
            unknown = expr.names(source) - known
        except expr.ExprError as exc:
            self.fail(where, str(exc))
        if unknown:
            self.fail(where, f"expression {source!r} uses unknown name(s) {sorted(unknown)}")


def _parse_field(chk: _Checker, where: str, canonical: str, raw: Any) -> FieldMap:
    if isinstance(raw, str):
        return FieldMap(canonical, key=raw)
    if not isinstance(raw, dict):
        chk.fail(where, "expected a format key or a mapping with key/default/value/map/codec")
    chk.keys(where, raw, _FIELD_KEYS)
    return FieldMap(canonical, **raw)


def _parse_entry(chk: _Checker, where: str, key: str, raw: Any, tensors: set[str], known: set[str]) -> Entry:
    if isinstance(raw, str):
        raw = {"from": [raw]}
    if not isinstance(raw, dict) or "from" not in raw:
        chk.fail(where, "expected a canonical tensor name or a mapping with 'from' and 'ops'")
    chk.keys(where, raw, _ENTRY_KEYS)
    sources = tuple([raw["from"]] if isinstance(raw["from"], str) else raw["from"])
    for src in sources:
        if src not in tensors:
            chk.fail(where, f"'from' names {src!r}, which is not a canonical tensor")
        if (LAYER in src) != (LAYER in key):
            chk.fail(where, f"per-layer tensors must map to per-layer keys ({src!r} -> {key!r})")
        if EXPERT in key and EXPERT not in src:
            chk.fail(where, f"a per-expert key must be made from per-expert tensors ({src!r} -> {key!r})")
    for op in raw.get("ops") or ():
        name, arg = (op, None) if isinstance(op, str) else next(iter(op.items()))
        if name not in OP_BUILDERS:
            chk.fail(where, f"unknown op {name!r}; known ops: {sorted(OP_BUILDERS)}")
        for leaf in _leaves(arg):
            chk.expression(where, leaf, known)
    op_names = {op if isinstance(op, str) else next(iter(op)) for op in raw.get("ops") or ()}
    if EXPERT not in key and any(EXPERT in src for src in sources) and "stack" not in op_names:
        chk.fail(where, f"{key!r} takes every expert's tensors, so its ops must stack them")
    chk.expression(where, raw.get("when"), known | ({"i"} if LAYER in key else set()))
    return Entry(key, sources, tuple(raw.get("ops") or ()), raw.get("when"), raw.get("tp"))


def _leaves(arg: Any) -> list[Any]:
    if isinstance(arg, dict):
        return [x for v in arg.values() for x in _leaves(v)]
    if isinstance(arg, (list, tuple)):
        return [x for v in arg for x in _leaves(v)]
    return [arg]


def _parse_format(chk: _Checker, name: str, raw: Mapping[str, Any], config: Mapping[str, Any],
                  tensors: set[str]) -> Format:
    where = f"formats.{name}"
    chk.keys(where, raw, _FORMAT_KEYS)
    params = dict(raw.get("params") or {})
    known = set(config) | set(params)
    fields = None
    if raw.get("config") is not None:
        fields = tuple(_parse_field(chk, f"{where}.config.{c}", c, v) for c, v in raw["config"].items())
        for f in fields:
            if f.canonical not in config:
                chk.fail(f"{where}.config.{f.canonical}", "not a canonical config field")
            chk.expression(f"{where}.config.{f.canonical}", default_expr(f.default), known)
    entries = tuple(_parse_entry(chk, f"{where}.tensors[{k!r}]", k, v, tensors, known)
                    for k, v in (raw.get("tensors") or {}).items())
    covered = {s for e in entries for s in e.sources}
    missing = tensors - covered
    if missing:
        chk.fail(where, f"canonical tensor(s) {sorted(missing)} are not mapped")
    ignore = tuple({"key": i} if isinstance(i, str) else i for i in raw.get("ignore") or ())
    for i, rule in enumerate(ignore):
        chk.expression(f"{where}.ignore[{i}]", rule.get("when"), known)
    unexpected = tuple(raw.get("unexpected") or ())
    for i, rule in enumerate(unexpected):
        if not isinstance(rule, dict) or set(rule) != {"prefix", "message"}:
            chk.fail(f"{where}.unexpected[{i}]", "expected {prefix: ..., message: ...}")
    return Format(name, fields, entries, ignore, frozenset(raw.get("inert") or ()),
                  tuple(raw.get("unsupported") or ()), params, tuple(raw.get("key_prefixes") or ()),
                  dict(raw.get("write") or {}), unexpected)


def default_expr(value: Any) -> Any:
    """Config defaults are constants unless written `= expression` (so 'layernorm' stays a string)."""
    return value[1:].strip() if isinstance(value, str) and value.startswith("=") else None


def _parse_arch(chk: _Checker, family: str, variant: str, raw: Mapping[str, Any]) -> ArchSpec:
    config = dict(raw.get("config") or {})
    for name, default in config.items():
        chk.expression(f"config.{name}", default_expr(default), set(config))
    tensors = []
    for name, t in (raw.get("tensors") or {}).items():
        t = {"shape": t} if isinstance(t, list) else t
        for dim in t["shape"]:
            chk.expression(f"tensors[{name!r}].shape", dim, set(config))
        chk.expression(f"tensors[{name!r}].when", t.get("when"), set(config) | ({"i"} if LAYER in name else set()))
        tensors.append(Tensor(name, tuple(t["shape"]), t.get("when")))
    names = {t.name for t in tensors}
    formats = {f: _parse_format(chk, f, v, config, names) for f, v in (raw.get("formats") or {}).items()}
    refused = dict(raw.get("refused") or {})
    for name in refused:
        if name in formats:
            chk.fail(f"refused.{name}", "the format is both mapped and refused")
    return ArchSpec(variant, family, chk.file, raw.get("description", ""), raw.get("architecture"),
                    raw.get("model_type"), config, tuple(tensors), formats, refused)


_SHIELDS = {LAYER: "\u00a7i\u00a7", EXPERT: "\u00a7e\u00a7"}   # stand in while YAML parses: braces open flow mappings


def _shield(text: str) -> str:
    for name, shield in _SHIELDS.items():
        text = text.replace(name, shield)
    return text


def _unshield(node: Any) -> Any:
    if isinstance(node, str):
        for name, shield in _SHIELDS.items():
            node = node.replace(shield, name)
        return node
    if isinstance(node, list):
        return [_unshield(x) for x in node]
    if isinstance(node, dict):
        return {_unshield(k): _unshield(v) for k, v in node.items()}
    return node


def parse_spec(text: str, file: str) -> list[ArchSpec]:
    chk = _Checker(file)
    try:
        raw = _unshield(yaml.load(_shield(text), Loader=_LOADER))
    except yaml.YAMLError as exc:
        raise SpecError(f"{file}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict) or "name" not in raw:
        chk.fail("top level", "expected a mapping with at least 'name'")
    chk.keys("top level", raw, _TOP_KEYS)
    base = {k: v for k, v in raw.items() if k != "variants"}
    variants = raw.get("variants") or {raw["name"]: {}}
    out = []
    for vname, over in variants.items():
        if not isinstance(over, dict):
            chk.fail(f"variants.{vname}", "expected a mapping")
        chk.keys(f"variants.{vname}", over, {"architecture", "model_type", "description", "config", "formats", "tensors",
                                                     "refused"})
        out.append(_parse_arch(chk, raw["name"], vname, _deep_merge(base, over)))
    return out


def _spec_files() -> list[tuple[str, str]]:
    folder = resources.files("rosetool.mappings") / "specs"
    return sorted((p.name, p.read_text()) for p in folder.iterdir() if p.name.endswith(".yaml"))


_CACHE: list[ArchSpec] | None = None


def all_specs() -> list[ArchSpec]:
    global _CACHE
    if _CACHE is None:
        _CACHE = [a for name, text in _spec_files() for a in parse_spec(text, name)]
    return _CACHE


def get_spec(name: str) -> ArchSpec:
    for spec in all_specs():
        if spec.name == name:
            return spec
    known = ", ".join(sorted(s.name for s in all_specs()))
    raise SpecError(f"unknown architecture {name!r}; known: {known}")


def spec_for_hf(architectures: list[str] | None, model_type: str | None, where: str) -> ArchSpec:
    """Pick the spec for an HF config: by class name first, then by model_type."""
    for spec in all_specs():
        if spec.architecture and spec.architecture in (architectures or []):
            return spec
    for spec in all_specs():
        if model_type and spec.model_type == model_type:
            return spec
    known = ", ".join(sorted(s.architecture for s in all_specs() if s.architecture))
    got = ", ".join(architectures or []) or model_type or "none given"
    raise SpecError(f"{where}: unknown architecture ({got}); supported: {known}")


def expand(template: str, layer: int | None, expert: int | None = None) -> str:
    out = template if layer is None else template.replace(LAYER, str(layer))
    return out if expert is None else out.replace(EXPERT, str(expert))


def is_layered(template: str) -> bool:
    return LAYER in template


def is_per_expert(template: str) -> bool:
    return EXPERT in template


def template_regex(template: str) -> re.Pattern[str]:
    """Key template -> regex capturing the layer (and expert) index (for matching keys back to entries)."""
    return re.compile(re.escape(template).replace(re.escape(LAYER), r"(\d+)").replace(re.escape(EXPERT), r"(\d+)") + "$")


def load_spec_file(path: str | Path) -> list[ArchSpec]:
    path = Path(path)
    return parse_spec(path.read_text(), path.name)
