"""Engine settings as the user gave them, and the few derived once the model and pool are known."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rosetool.dtypes import parse_dtype
from rosetool.errors import RosetoolError


@dataclass(slots=True)
class EngineConfig:
    device: torch.device
    dtype: torch.dtype | None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    adapters: tuple[str, ...] = ()     # LoRA folders merged into the model at load, in order

    def __post_init__(self) -> None:
        positive = {"max_num_seqs": self.max_num_seqs, "block_size": self.block_size,
                    "max_num_batched_tokens": self.max_num_batched_tokens}
        if self.num_kv_blocks is not None:
            positive["num_kv_blocks"] = self.num_kv_blocks
        if self.max_model_len is not None:
            positive["max_model_len"] = self.max_model_len
        for name, value in positive.items():
            if value < 1:
                raise RosetoolError(f"LLM: {name} must be >= 1, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RosetoolError(
                f"LLM: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise RosetoolError(f"LLM: device must be 'cpu' or 'cuda', got '{device}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RosetoolError("LLM: device 'cuda' requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise RosetoolError(f"LLM: device must be 'cpu' or 'cuda', got '{device}'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
