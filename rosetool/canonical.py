"""The canonical config: the one description of a model that specs, converters and the runtime share.

It sits below both converters and runtime and imports no torch, so `inspect` and `mappings` stay
instant. Every format's config is translated to these fields (by the spec's `config` tables); what the
runtime cannot run is refused here, by field name, at conversion time as well as at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import RosetoolError

ROPE_TYPES = ("llama3", "linear")   # besides plain RoPE; anything else is refused by name
NORMS = ("layernorm", "rmsnorm")
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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise RosetoolError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.norm not in NORMS:
            raise RosetoolError(f"unsupported norm {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise RosetoolError(f"unsupported activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        kind = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling and kind not in ROPE_TYPES:
            raise RosetoolError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.qk_norm_full_width and not self.qk_norm:
            raise RosetoolError("qk_norm_full_width says how wide the q/k norm is; it needs qk_norm")
        if self.num_experts:
            self._check_moe()

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

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})
