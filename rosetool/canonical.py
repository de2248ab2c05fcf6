"""The canonical config: the one description of a model that specs, converters and the runtime share.

It sits below both converters and runtime and imports no torch, so `inspect` and `mappings` stay
instant. Every format's config is translated to these fields (by the spec's `config` tables); what the
runtime cannot run is refused here, by field name, at conversion time as well as at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import RosetoolError

ROPE_TYPES = ("llama3", "linear", "yarn")   # besides plain RoPE; anything else is refused by name
NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")   # gemma_rmsnorm: x / rms(x) * (1 + weight)
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
POSITIONS = ("rope", "learned")
ROUTER_SCORINGS = ("softmax", "sigmoid")
LATENT_NORM_EPS = 1e-6   # DeepSeek (and HF) build the q/kv latent norms with this eps, whatever rms_norm_eps says
GROUP_SCORES = ("max", "top2_sum")   # a group's score: its best expert (DeepSeek-V2) or its best two summed (V3)


@dataclass(frozen=True)
class Field:
    """What one canonical field may hold. A config comes from a user's file, so `vocab_size: "500"`
    or `num_heads: 0` is refused here, by name, before it reaches a tensor shape."""
    kind: str                     # "int", "float", "bool", "str", "dict", "token_ids", "str_list" or "int_list"
    low: float | None = None      # inclusive minimum for numbers
    choices: tuple[str, ...] = ()
    optional: bool = False        # None allowed

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else "is required"
        ok = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
              "token_ids": lambda v: _is_int(v) or (isinstance(v, list) and bool(v) and all(map(_is_int, v))),
              "str_list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "int_list": lambda v: isinstance(v, list) and all(map(_is_int, v))}
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
               "dict": "an object", "token_ids": "a token id or a list of token ids",
               "str_list": "a list of strings", "int_list": "a list of integers"}
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
    "partial_rotary_factor": Field("float", low=0.0), "rope_interleaved": _FLAG, "parallel_residual": _FLAG,
    "shared_norm": _FLAG, "lm_head_bias": _FLAG, "scale_embeddings": _FLAG, "sandwich_norms": _FLAG,
    "query_pre_attn_scalar": Field("float", low=1e-9, optional=True),
    "attn_softcap": Field("float", low=1e-9, optional=True), "final_softcap": Field("float", low=1e-9, optional=True),
    "layer_types": Field("str_list", optional=True), "rope_local_theta": Field("float", low=1e-9, optional=True),
    "num_experts": Field("int", low=0), "num_experts_per_tok": Field("int", low=0),
    "moe_intermediate_size": Field("int", low=1, optional=True), "shared_expert_intermediate_size": Field("int", low=0),
    "shared_expert_gate": _FLAG, "norm_topk_prob": _FLAG, "mlp_only_layers": Field("int_list", low=0),
    "qk_norm_full_width": _FLAG,
    "kv_lora_rank": Field("int", low=1, optional=True), "q_lora_rank": Field("int", low=1, optional=True),
    "qk_rope_head_dim": Field("int", low=0), "v_head_dim": Field("int", low=1, optional=True),
    "router_scoring": Field("str", choices=ROUTER_SCORINGS), "router_bias": _FLAG, "router_fp32": _FLAG,
    "expert_groups": _SIZE, "topk_groups": _SIZE, "group_score": Field("str", choices=GROUP_SCORES),
    "routed_scaling_factor": Field("float", low=0.0),
}


# rope_scaling entries the runtime computes with, and the least each may be: a factor of NaN or -4
# would otherwise convert and generate garbage (or divide by zero: llama3's high == low).
ROPE_SCALING_NUMBERS: dict[str, tuple[float, bool]] = {   # name -> (bound, strictly above it)
    "factor": (0.0, True), "original_max_position_embeddings": (1.0, False), "low_freq_factor": (0.0, True),
    "high_freq_factor": (0.0, True), "beta_fast": (0.0, True), "beta_slow": (0.0, True),
    "mscale": (0.0, False), "mscale_all_dim": (0.0, False), "attention_factor": (0.0, True),
}


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """Every number in rope_scaling finite, the ones RoPE divides or scales by in range."""
    for name, value in scaling.items():
        if value is None or isinstance(value, bool) or name in ("rope_type", "type"):
            continue
        if not _is_number(value):
            raise RosetoolError(f"config field rope_scaling.{name} must be a finite number, got {value!r}")
        bound, strict = ROPE_SCALING_NUMBERS.get(name, (-math.inf, False))
        if value < bound or (strict and value == bound):
            raise RosetoolError(f"config field rope_scaling.{name} must be {'>' if strict else '>='} {bound:g}, "
                                f"got {value!r}")
    if scaling.get("original_max_position_embeddings") is not None \
            and not _is_int(scaling["original_max_position_embeddings"]):
        raise RosetoolError("config field rope_scaling.original_max_position_embeddings must be an integer, "
                            f"got {scaling['original_max_position_embeddings']!r}")
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}.get(scaling.get("rope_type"), ())
    missing = [n for n in needs if scaling.get(n) is None]
    if missing:
        raise RosetoolError(f"rope_scaling {scaling.get('rope_type')} needs {', '.join(missing)}")
    if scaling.get("rope_type") == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise RosetoolError(f"config field rope_scaling.high_freq_factor={scaling['high_freq_factor']} must be "
                            f"above low_freq_factor={scaling['low_freq_factor']}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `factor` times (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
    # Families beyond Llama (GPT-NeoX, GPT-J, Phi): rotary layout and block shape.
    partial_rotary_factor: float = 1.0  # rotate the first int(head_dim * factor) dims of each head (HF's rounding)
    rope_interleaved: bool = False      # GPT-J pairs dims (2i, 2i+1); otherwise rotate-half (first/second half)
    parallel_residual: bool = False     # x + attn(norm(x)) + mlp(norm'(x)) instead of two residual steps
    shared_norm: bool = False           # parallel blocks with one norm feeding both branches (GPT-J, Phi-2)
    lm_head_bias: bool = False
    scale_embeddings: bool = False      # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False        # Gemma 2: norms after attention and MLP too (post_attn_norm, post_mlp_norm)
    query_pre_attn_scalar: float | None = None   # attention scale is its -1/2 power (None: head_dim's)
    attn_softcap: float | None = None   # scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # the same on the output logits
    layer_types: list[str] | None = None   # per layer "sliding_attention" | "full_attention"; None: all alike
    rope_local_theta: float | None = None  # Gemma 3: plain RoPE base of windowed layers (None: rope_theta)

    # Mixture of experts (0 experts = dense). A layer is MoE unless listed in mlp_only_layers, the one
    # list HF's decoder_sparse_step/mlp_only_layers and Megatron's moe_layer_freq fold into.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    qk_norm_full_width: bool = False   # with qk_norm: OLMoE's q/k RMSNorm over all heads at once, not per head
    # DeepSeek-V2/V3 routing: scores (softmax or sigmoid, in fp32 from fp32 logits when router_fp32), a bias
    # added for choosing experts only, experts chosen within the top `topk_groups` of `expert_groups`
    # groups, chosen weights times routed_scaling_factor.
    router_scoring: str = "softmax"
    router_bias: bool = False
    router_fp32: bool = False
    expert_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0

    # Multi-head latent attention (DeepSeek-V2/V3): K and V of every head come from one compressed latent
    # of kv_lora_rank dims per token plus qk_rope_head_dim rotated dims shared by all heads; head_dim is a
    # q/k head's width (unrotated + rotated dims, the rotated ones last), v_head_dim a value head's.
    kv_lora_rank: int | None = None    # None: standard attention
    q_lora_rank: int | None = None     # None: q projected directly from the hidden state
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer: Gemma 2 alternates windowed and full layers."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        scale = (self.query_pre_attn_scalar or self.head_dim) ** -0.5
        if self.is_mla:   # DeepSeek's YaRN also sharpens the softmax by mscale(factor, mscale_all_dim)^2
            s = self.rope_scaling or {}
            scale *= yarn_mscale(s.get("factor", 1.0), s.get("mscale_all_dim") or 0) ** 2
        return scale

    def __post_init__(self) -> None:
        check_fields({f.name: getattr(self, f.name) for f in fields(self)})
        if self.num_heads % self.num_kv_heads:
            raise RosetoolError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        rot = int(self.head_dim * self.partial_rotary_factor)
        if not (0 < rot <= self.head_dim and rot % 2 == 0):
            raise RosetoolError(f"partial_rotary_factor={self.partial_rotary_factor} rotates {rot} of "
                                f"head_dim={self.head_dim} dims; it must be an even count, at least 2")
        if self.shared_norm and not self.parallel_residual:
            raise RosetoolError("shared_norm=true needs parallel_residual=true")
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers or
                                             set(self.layer_types) - {"sliding_attention", "full_attention"}):
            raise RosetoolError(f"layer_types must give sliding_attention or full_attention for each of "
                                f"{self.num_layers} layers, got {self.layer_types}")
        kind = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling and kind not in ROPE_TYPES:
            raise RosetoolError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_scaling:
            check_rope_scaling(self.rope_scaling)
        if self.qk_norm_full_width and not self.qk_norm:
            raise RosetoolError("qk_norm_full_width says how wide the q/k norm is; it needs qk_norm")
        if self.num_experts:
            self._check_moe()
        if self.is_mla:
            self._check_mla()
        if kind == "yarn" and not {"factor", "original_max_position_embeddings"} <= set(self.rope_scaling):
            raise RosetoolError("rope_scaling yarn needs factor and original_max_position_embeddings")

    def _check_moe(self) -> None:
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise RosetoolError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                                f"{self.num_experts}")
        if not self.glu or self.mlp_bias:
            raise RosetoolError("MoE layers are gated (glu) and bias-free; got "
                                f"glu={self.glu}, mlp_bias={self.mlp_bias}")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise RosetoolError("shared_expert_gate needs a shared expert (shared_expert_intermediate_size > 0)")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            raise RosetoolError(f"mlp_only_layers {outside} are not layers of a {self.num_layers}-layer model")
        per_group, groups = divmod(self.num_experts, self.expert_groups)
        if groups or not 1 <= self.topk_groups <= self.expert_groups:
            raise RosetoolError(f"{self.num_experts} experts in expert_groups={self.expert_groups} groups, "
                                f"topk_groups={self.topk_groups}: the groups must divide the experts and "
                                f"topk_groups be in 1..expert_groups")
        if self.num_experts_per_tok > self.topk_groups * per_group:
            raise RosetoolError(f"num_experts_per_tok={self.num_experts_per_tok} is more than the "
                                f"{self.topk_groups} chosen groups of {per_group} experts hold")
        if self.group_score == "top2_sum" and per_group < 2 and self.expert_groups > 1:
            raise RosetoolError("group_score top2_sum needs at least 2 experts per group")

    def _check_mla(self) -> None:
        if self.num_kv_heads != self.num_heads:
            raise RosetoolError(f"latent attention expands K/V for every head: num_kv_heads={self.num_kv_heads} "
                                f"must equal num_heads={self.num_heads}")
        if not 0 < self.qk_rope_head_dim < self.head_dim or self.qk_rope_head_dim % 2:
            raise RosetoolError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and below "
                                f"head_dim={self.head_dim} (unrotated + rotated dims)")
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})
