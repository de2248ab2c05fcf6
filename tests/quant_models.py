"""Quantized checkpoints as their publishers lay them out, written by test code independent of rosetool's
codecs (plain per-block loops, compressed-tensors' own packer), and the exact dequantized values the
published formula defines, to compare rosetool against."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0


def is_linear(key: str, t: torch.Tensor) -> bool:
    """The decoder Linear weights publishers quantize (not norms, routers, embeddings or the head)."""
    return t.ndim == 2 and ".layers." in key and key.endswith(".weight") and "norm" not in key \
        and not key.endswith((".mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight"))


def fp8_block(w: torch.Tensor, block: tuple[int, int], ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's layout: weight_scale_inv[i, j] = amax(block) / 448, codes = w / scale_inv; edge blocks partial."""
    n, k = w.shape
    bn, bk = block
    inv = torch.empty(math.ceil(n / bn), math.ceil(k / bk), dtype=torch.float32)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(inv.shape[0]):
        for j in range(inv.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s = max(float(blk.abs().max()), 1e-12) / FP8_MAX
            if ue8m0:
                s = 2.0 ** math.ceil(math.log2(s))
            inv[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / inv[i, j]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, inv


def dequant_block(q: torch.Tensor, inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bf16(fp32(q) * fp32(scale of its block)), element block by block."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    bn, bk = block
    scale = inv.float() if inv.dtype != torch.float8_e8m0fnu else inv.float()
    for i in range(inv.shape[0]):
        for j in range(inv.shape[1]):
            sl = (slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk))
            out[sl] = (q[sl].float() * scale[i, j]).to(torch.bfloat16)
    return out


def quantize_folder(src: Path, dst: Path, scheme: str = "fp8-block", block: tuple[int, int] = (16, 16),
                    ue8m0: bool = False, e8m0_dtype: bool = False, scale_name: str = "weight_scale_inv",
                    input_scale: bool = False, group: int = 16) -> dict[str, torch.Tensor]:
    """Write `src` (an HF bf16/fp32 folder) quantized to `dst`; returns the exact dequantized value of every
    tensor (unquantized ones as stored)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    out: dict[str, torch.Tensor] = {}
    expect: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        if not is_linear(key, w):
            out[key] = w.to(torch.bfloat16)     # releases store the rest in bf16
            expect[key] = out[key]
            continue
        stem = key[:-len("weight")]
        w = w.to(torch.bfloat16)
        if scheme == "fp8-block":
            q, inv = fp8_block(w, block, ue8m0)
            out[key] = q
            out[stem + scale_name] = inv.to(torch.float8_e8m0fnu) if e8m0_dtype else inv
            expect[key] = dequant_block(q, inv, block)
        elif scheme == "fp8-tensor":
            s = torch.tensor(float(w.float().abs().max()) / FP8_MAX)
            out[key] = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[stem + "weight_scale"] = s
            expect[key] = (out[key].float() * s).to(torch.bfloat16)
        elif scheme == "int4-group":
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
            n, k = w.shape
            g = w.float().reshape(n, k // group, group)
            scale = (g.abs().amax(-1) / 7.5).to(torch.bfloat16)
            codes = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).reshape(n, k)
            out[stem + "weight_packed"] = pack_to_int32(codes, 4)
            out[stem + "weight_scale"] = scale
            out[stem + "weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            expect[key] = (codes.float().reshape(n, k // group, group) * scale.float()[..., None]) \
                .to(torch.bfloat16).reshape(n, k)
        else:
            raise ValueError(scheme)
        if input_scale:
            out[stem + "input_scale"] = torch.tensor(0.02)
    if scheme.startswith("fp8"):
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic" if not input_scale else "static"}
        if scheme == "fp8-block":
            qc["weight_block_size"] = list(block)
        if ue8m0:
            qc["scale_fmt"] = "ue8m0"
    else:
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}},
              "ignore": ["lm_head"]}
    cfg["quantization_config"] = qc
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return expect
