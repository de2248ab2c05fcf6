"""`rosetool inspect`: what a checkpoint is, how it is configured, and every tensor in it."""

from __future__ import annotations

import math
from typing import Any

import typer
from rich.table import Table

from ..converters.config_map import unknown_fields
from ..converters.sources import Checkpoint, open_checkpoint
from .output import out, print_json


def summary(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config
    params = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    family = {
        "attention": f"{cfg['num_heads']} heads, {cfg['num_kv_heads']} kv heads "
                     f"({cfg['num_heads'] // cfg['num_kv_heads']} per group), head_dim {cfg['head_dim']}",
        "positions": "learned" if cfg["position"] == "learned" else
                     f"rope theta={cfg['rope_theta']} scaling={cfg['rope_scaling'] or 'none'}",
        "tied_embeddings": cfg["tie_word_embeddings"],
        "sliding_window": cfg.get("sliding_window"),
        **_moe_summary(cfg),
    }
    return {
        "path": str(ckpt.path), "format": ckpt.format, "architecture": ckpt.spec.name,
        "family": ckpt.spec.family, "config": cfg, "derived": family,
        "unknown_config_fields": unknown_fields(ckpt.spec.format(ckpt.format), ckpt.raw_config),
        "parameters": params, "bytes": ckpt.nbytes, "info": ckpt.info,
        "tensors": [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for k, t in sorted(ckpt.tensors.items(), key=lambda kv: _natural(kv[0]))],
    }



def _moe_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("num_experts"):
        return {}
    dense = set(cfg.get("mlp_only_layers") or ())
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return {
        "experts": f"{cfg['num_experts']} experts, top-{cfg['num_experts_per_tok']} "
                   f"({'renormalised' if cfg.get('norm_topk_prob') else 'raw softmax'} weights), "
                   f"expert ffn {cfg.get('moe_intermediate_size')}",
        "shared_expert": f"ffn {shared}{', sigmoid gate' if cfg.get('shared_expert_gate') else ''}" if shared else "none",
        "moe_layers": f"{[i for i in range(cfg['num_layers']) if i not in dense]} "
                      f"(dense: {sorted(dense) if dense else 'none'})",
    }


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def inspect(path: str = typer.Argument(..., help="Checkpoint folder (HF, native or Megatron) or cached hub id."),
            as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
            all_tensors: bool = typer.Option(False, "--all", help="List every tensor (default: the first 40).")) -> None:
    """Detected format and architecture, config summary, tensor table, parameter count and bytes."""
    data = summary(open_checkpoint(path))
    if as_json:
        print_json(data)
        return
    head = Table(title=f"{data['path']}", show_header=False)
    for k, v in [("format", data["format"]), ("architecture", f"{data['architecture']} ({data['family']} family)"),
                 *data["derived"].items(), ("parameters", f"{data['parameters']:,}"), ("bytes", f"{data['bytes']:,}"),
                 *[(k, str(v)) for k, v in data["info"].items()]]:
        head.add_row(k, str(v))
    if data["unknown_config_fields"]:
        head.add_row("unmapped config", ", ".join(data["unknown_config_fields"]))
    out.print(head)
    cfg = Table("field", "value", title="canonical config")
    for k, v in data["config"].items():
        cfg.add_row(k, str(v))
    out.print(cfg)
    tensors = Table("tensor", "shape", "dtype", title=f"{len(data['tensors'])} tensors")
    shown = data["tensors"] if all_tensors else data["tensors"][:40]
    for t in shown:
        tensors.add_row(t["name"], str(t["shape"]), t["dtype"])
    if len(shown) < len(data["tensors"]):
        tensors.add_row(f"... {len(data['tensors']) - len(shown)} more (--all)", "", "")
    out.print(tensors)
