"""Random PEFT LoRA adapters on the tiny test models, and peft's own merge as the reference.

`init_lora_weights=True` would leave B zero (a no-op adapter); every lora_A, lora_B and
`modules_to_save` tensor is redrawn instead, so a dropped or misplaced factor changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


def make_adapter(base: Path, out: Path, seed: int = 0, **lora: Any) -> Path:
    """A PEFT adapter on `base` with random A, B (and modules_to_save) tensors, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(load_hf(base), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, *adapters: Path):
    """peft's merge_and_unload of each adapter in turn: the reference a merge must match."""
    from peft import PeftModel
    model = load_hf(base)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(folder / "adapter_model.safetensors")
