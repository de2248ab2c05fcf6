"""The canonical config: the one description of a model that specs, converters and the runtime share.

It sits below both converters and runtime and imports no torch, so `inspect` and `mappings` stay
instant. Every format's config is translated to these fields (by the spec's `config` tables); what the
runtime cannot run is refused here, by field name, at conversion time as well as at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import RosetoolError

ROPE_TYPES = ("llama3", "linear")   # besides plain RoPE; anything else is refused by name
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class Field:
    """What one canonical field may hold. A config comes from a user's file, so `vocab_size: "500"`
    or `num_heads: 0` is refused here, by name, before it reaches a tensor shape."""
    kind: str                     # "int", "float", "bool", "str", "dict" or "token_ids"
    low: float | None = None      # inclusive minimum for numbers
    choices: tuple[str, ...] = ()
    optional: bool = False        # None allowed

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else "is required"
        ok = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
              "token_ids": lambda v: _is_int(v) or (isinstance(v, list) and bool(v) and all(map(_is_int, v)))}
        if not ok[self.kind](value):
            return f"must be {_KIND_WORDS[self.kind]}, got {value!r} ({type(value).__name__})"
        if self.choices and value not in self.choices:
            return f"{value!r} is not supported; supported: {', '.join(self.choices)}"
        low = self.low
        if low is not None and any(v < low for v in (value if isinstance(value, list) else [value])):
            return f"must be >= {low:g}, got {value!r}"
        return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_KIND_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "dict": "an object", "token_ids": "a token id or a list of token ids"}
_SIZE = Field("int", low=1)
_FLAG = Field("bool")

def check_fields(values: dict[str, Any]) -> None:
    """Refuse the first canonical field whose value has the wrong type or range; other keys are ignored."""
    for name, value in values.items():
        problem = FIELDS[name].problem(value) if name in FIELDS else None
        if problem:
            raise RosetoolError(f"config field {name} {problem}")


# Every ModelArgs field and what it may hold; a new field adds a row (a test checks none is missing).
FIELDS: dict[str, Field] = {
    "vocab_size": _SIZE, "hidden_size": _SIZE, "num_layers": _SIZE, "num_heads": _SIZE, "num_kv_heads": _SIZE,
    "head_dim": _SIZE, "intermediate_size": _SIZE, "max_position_embeddings": _SIZE,
    "norm": Field("str", choices=NORMS), "norm_eps": Field("float", low=0.0), "norm_bias": _FLAG,
    "activation": Field("str", choices=ACTIVATIONS), "glu": _FLAG, "position": Field("str", choices=POSITIONS),
    "rope_theta": Field("float", low=1e-9, optional=True), "rope_scaling": Field("dict", optional=True),
    "qkv_bias": _FLAG, "o_bias": _FLAG, "mlp_bias": _FLAG, "qk_norm": _FLAG, "tie_word_embeddings": _FLAG,
    "sliding_window": Field("int", low=1, optional=True),
    "bos_token_id": Field("token_ids", low=0, optional=True), "eos_token_id": Field("token_ids", low=0, optional=True),
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    activation: str = "silu"
    glu: bool = True
    position: str = "rope"
    rope_theta: float | None = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        check_fields({f.name: getattr(self, f.name) for f in fields(self)})
        if self.num_heads % self.num_kv_heads:
            raise RosetoolError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        kind = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling and kind not in ROPE_TYPES:
            raise RosetoolError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})
