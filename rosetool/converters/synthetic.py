"""Synthetic HF checkpoints of any size and any spec'd architecture, written tensor by tensor.

For conversion benchmarks and memory tests: building a 4 GB model with transformers would itself need
4 GB of RAM, which would hide what the converter uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..mappings.spec import spec_for_hf
from .config_map import read_config, write_config
from .plan import expand_format
from .safetensors_io import StreamWriter


def gpt2_config(n_layer: int, n_embd: int, vocab_size: int = 1024, n_positions: int = 1024) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": n_layer, "n_embd": n_embd,
            "n_head": max(1, n_embd // 64), "vocab_size": vocab_size, "n_positions": n_positions}


def llama_config(n_layer: int, hidden: int, vocab_size: int = 1024) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": n_layer,
            "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 64 * 64,
            "num_attention_heads": max(1, hidden // 128), "num_key_value_heads": max(1, hidden // 512),
            "vocab_size": vocab_size, "max_position_embeddings": 4096}


def mixtral_config(n_layer: int, hidden: int, vocab_size: int = 1024, experts: int = 8) -> dict:
    """Mixtral shapes: `experts` SwiGLU experts of Mistral-7B's ffn/hidden ratio, top-2."""
    return {**llama_config(n_layer, hidden, vocab_size), "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral", "intermediate_size": hidden * 7 // 2, "num_local_experts": experts,
            "num_experts_per_tok": 2}


def write_synthetic_hf(folder: Path, raw_config: dict, dtype: torch.dtype = torch.float16, seed: int = 0,
                       std: float = 0.02) -> int:
    """Write config.json + model.safetensors filled with seeded noise; returns the bytes written.
    (`std` as GPT-2's init, so a model built this way runs in fp16 without overflowing.)"""
    spec = spec_for_hf(raw_config["architectures"], raw_config["model_type"], str(folder))
    fmt = spec.format("hf")
    config = read_config(spec, fmt, raw_config, str(folder))
    steps = expand_format(spec, fmt, config)
    folder.mkdir(parents=True, exist_ok=True)
    writer = StreamWriter(folder / "model.safetensors", [(s.key, dtype, s.shape) for s in steps])
    gen = torch.Generator().manual_seed(seed)
    for s in steps:
        writer.write(s.key, (torch.randn(s.shape, generator=gen) * std).to(dtype))
    writer.close()
    (folder / "config.json").write_text(json.dumps({**raw_config, **write_config(fmt, config)}, indent=2))
    return sum(math.prod(s.shape) * dtype.itemsize for s in steps)
