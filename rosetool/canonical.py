"""The canonical config: the one description of a model that specs, converters and the runtime share.

It sits below both converters and runtime and imports no torch, so `inspect` and `mappings` stay
instant. Every format's config is translated to these fields (by the spec's `config` tables); what the
runtime cannot run is refused here, by field name, at conversion time as well as at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import RosetoolError

ROPE_TYPES = ("llama3", "linear")   # besides plain RoPE; anything else is refused by name
NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")   # gemma_rmsnorm: x / rms(x) * (1 + weight)
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")


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

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer: Gemma 2 alternates windowed and full layers."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise RosetoolError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.norm not in NORMS:
            raise RosetoolError(f"unsupported norm {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise RosetoolError(f"unsupported activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
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

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})
