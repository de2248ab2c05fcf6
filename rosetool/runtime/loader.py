"""Load any checkpoint rosetool reads into the runtime's Transformer (converted in memory)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..converters.api import load_state
from ..converters.sources import TOKENIZER_FILES, Checkpoint, open_checkpoint
from ..canonical import ModelArgs
from .model import Transformer

if TYPE_CHECKING:
    from .tp_shard import TPShard


@dataclass
class LoadedInfo:
    path: Path
    format: str
    architecture: str
    tokenizer: Any = None
    eos_token_ids: list[int] = field(default_factory=list)
    args: ModelArgs | None = None   # the whole model's, also when the Transformer is one rank's shard


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def load_tokenizer(path: Path) -> Any:
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:   # a tokenizer is a convenience here: token ids still work without one
        return None


def eos_ids(ckpt: Checkpoint) -> list[int]:
    gen = ckpt.path / "generation_config.json"
    if gen.exists():
        ids = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        if ids:
            return ids
    return _ids(ckpt.config.get("eos_token_id"))


def build_model(ckpt: Checkpoint, state: dict[str, torch.Tensor], dtype: torch.dtype | None,
                device: str | torch.device, make: Callable[[ModelArgs], Transformer] = Transformer) -> Transformer:
    args = ModelArgs.from_dict(ckpt.config)
    with torch.device("meta"):
        model = make(args)
    model.load_state_dict(state, strict=True, assign=True)
    dtype = dtype or next(iter(state.values())).dtype
    model = model.to(device=device, dtype=dtype).eval()
    _keep_routers_fp32(model, state, device)
    return model


def _keep_routers_fp32(model: Transformer, state: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """DeepSeek routes in fp32 from fp32 weights (transformers keeps `gate.weight` and the choice bias fp32 in
    any dtype): rounding them to bf16 with the rest would move expert choices near ties."""
    from .moe import Router
    for name, module in model.named_modules():
        if isinstance(module, Router) and module.args.router_fp32:
            for param in ("weight", "choice_bias"):
                if getattr(module, param) is not None:
                    exact = state[f"{name}.{param}"].to(device=device, dtype=torch.float32)
                    setattr(module, param, torch.nn.Parameter(exact, requires_grad=False))


def load_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", shard: TPShard | None = None,
               adapters: Sequence[str | os.PathLike] = ()) -> tuple[Transformer, LoadedInfo]:
    """The whole model, or with `shard` one tensor-parallel rank's part of it; `adapters` (LoRA
    folders) are merged into it in order as it loads."""
    ckpt = open_checkpoint(path_or_id)
    if adapters:
        from ..adapters.merge import with_adapters
        ckpt = with_adapters(ckpt, adapters, dtype)
    if shard is None:
        ckpt, state = load_state(ckpt, "native")
        model = build_model(ckpt, state, dtype, device)
    else:
        model = build_model(ckpt, shard.state(ckpt), dtype, device, shard.make)
    info = LoadedInfo(ckpt.path, ckpt.format, ckpt.spec.name, load_tokenizer(ckpt.path), eos_ids(ckpt),
                      ModelArgs.from_dict(ckpt.config))
    return model, info
