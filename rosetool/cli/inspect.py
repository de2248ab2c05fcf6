"""`rosetool inspect`: what a checkpoint is, how it is configured, and every tensor in it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from ..converters.config_map import unknown_fields
from ..converters.safetensors_io import TensorInfo
from .family_facts import family_facts
from .output import out, print_json

if TYPE_CHECKING:
    from ..converters.sources import Checkpoint

_RANK = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")


def summary(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config
    params = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    family = {
        "attention": f"{cfg['num_heads']} heads, q/k head_dim {cfg['head_dim']}, v head_dim {cfg.get('v_head_dim')}, "
                     f"K/V from one latent" if cfg.get("kv_lora_rank") is not None else
                     f"{cfg['num_heads']} heads, {cfg['num_kv_heads']} kv heads "
                     f"({cfg['num_heads'] // cfg['num_kv_heads']} per group), head_dim {cfg['head_dim']}",
        "positions": "learned" if cfg["position"] == "learned" else
                     f"rope theta={cfg['rope_theta']} scaling={cfg['rope_scaling'] or 'none'}",
        "tied_embeddings": cfg["tie_word_embeddings"],
        "sliding_window": cfg.get("sliding_window"),
        **family_facts(cfg),
        **_moe_summary(cfg),
    }
    quant = ckpt.info.get("quant")
    return {
        "path": str(ckpt.path), "format": ckpt.format, "architecture": ckpt.spec.name,
        "family": ckpt.spec.family, "config": cfg, "derived": family,
        "unknown_config_fields": unknown_fields(ckpt.spec.format(ckpt.format), ckpt.raw_config),
        "parameters": params, "parameters_without_vocab_padding": params - _padding(ckpt),
        "bytes": ckpt.nbytes, "info": {k: v for k, v in ckpt.info.items() if k != "quant"},
        "quantization": quant.describe(ckpt.nbytes) if quant else None, "ranks": rank_layout(ckpt),
        "tensors": [{"name": k, "shape": list(t.shape), "dtype": _dtype_name(t)}
                    for k, t in sorted(ckpt.tensors.items(), key=lambda kv: _natural(kv[0]))],
    }


def _dtype_name(t: Any) -> str:
    """Safetensors headers name their dtype; asking a torch dtype would import torch for nothing. A
    quantized weight shows what it decodes to and how it is stored."""
    if isinstance(t, TensorInfo):
        return t.dtype_name
    name = str(t.dtype).removeprefix("torch.")
    return f"{name} <- {t.codec}" if hasattr(t, "codec") else name


def _padding(ckpt: Checkpoint) -> int:
    """Parameters in the rows Megatron adds to the vocabulary (to a multiple of 128 x TP): not the model's."""
    padded = ckpt.info.get("params", {}).get("padded_vocab_size")
    vocab = ckpt.config["vocab_size"]
    if not padded or padded <= vocab:
        return 0
    return sum((padded - vocab) * math.prod(t.shape[1:]) for t in ckpt.tensors.values()
               if t.shape and t.shape[0] == padded)


def rank_layout(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """One row per file of a Megatron checkpoint: its TP rank and PP stage (torch format), tensors, bytes."""
    ranks = ckpt.info.get("ranks")
    if ranks is not None:
        rows = []
        for rel, shapes in ranks.items():
            m = _RANK.search(rel)
            rows.append({"file": rel, "tp": int(m.group(1)) if m else None,
                         "pp": int(m.group(2) or 0) if m else None, "tensors": len(shapes),
                         "bytes": (Path(ckpt.path) / rel).stat().st_size})
        return rows
    if ckpt.info.get("megatron", {}).get("format") == "torch_dist":
        folder = next(iter(ckpt.tensors.values())).file.parent
        return [{"file": str(f.relative_to(ckpt.path)), "tp": None, "pp": None, "tensors": None,
                 "bytes": f.stat().st_size} for f in sorted(folder.iterdir()) if f.is_file()]
    return []


def _moe_summary(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("num_experts"):
        return {}
    dense = set(cfg.get("mlp_only_layers") or ())
    shared = cfg.get("shared_expert_intermediate_size") or 0
    scoring = cfg.get("router_scoring", "softmax")
    return {
        "experts": f"{cfg['num_experts']} experts, top-{cfg['num_experts_per_tok']} "
                   f"({'renormalised' if cfg.get('norm_topk_prob') else 'raw ' + scoring} weights), "
                   f"expert ffn {cfg.get('moe_intermediate_size')}",
        **_routing(cfg),
        "shared_expert": f"ffn {shared}{', sigmoid gate' if cfg.get('shared_expert_gate') else ''}" if shared else "none",
        "moe_layers": f"{[i for i in range(cfg['num_layers']) if i not in dense]} "
                      f"(dense: {sorted(dense) if dense else 'none'})",
    }


def _routing(cfg: dict[str, Any]) -> dict[str, str]:
    """DeepSeek's additions to top-k routing, only where a model uses them."""
    parts = []
    if cfg.get("router_scoring") == "sigmoid":
        parts.append("sigmoid scores")
    if cfg.get("router_bias"):
        parts.append("a per-expert bias steers the choice (not the weights)")
    if (cfg.get("expert_groups") or 1) > 1:
        how = "best two summed" if cfg.get("group_score") == "top2_sum" else "best expert"
        parts.append(f"chosen within the best {cfg['topk_groups']} of {cfg['expert_groups']} expert groups "
                     f"(a group scores its {how})")
    if (cfg.get("routed_scaling_factor") or 1.0) != 1.0:
        parts.append(f"weights times {cfg['routed_scaling_factor']}")
    return {"routing": "; ".join(parts)} if parts else {}


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _parallel(data: dict[str, Any]) -> str:
    args = data["info"].get("megatron", {}).get("args", {})
    sizes = [f"TP={args.get('tensor_model_parallel_size') or 1}", f"PP={args.get('pipeline_model_parallel_size') or 1}"]
    ep = args.get("expert_model_parallel_size")
    return " x ".join(sizes + ([f"EP={ep}"] if ep and ep > 1 else []))


def _print_megatron(data: dict[str, Any]) -> None:
    meg = data["info"]["megatron"]
    args = Table("Megatron arg", "value", title=f"Megatron {meg['format']} checkpoint, keys {meg['layout']}, "
                 f"iteration {data['info'].get('iteration')}, {_parallel(data)}")
    for k, v in meg.get("args", {}).items():
        args.add_row(k, str(v))
    out.print(args)
    if "bridge" in meg:
        _print_bridge(meg["bridge"])
    if not data["ranks"]:
        return
    ranks = Table("file", "TP rank", "PP stage", "tensors", "bytes", title=f"rank layout: {_parallel(data)}, "
                  f"{len(data['ranks'])} files")
    for r in data["ranks"]:
        ranks.add_row(r["file"], *("-" if r[k] is None else str(r[k]) for k in ("tp", "pp", "tensors")),
                      f"{r['bytes']:,}")
    ranks.add_row("total", "", "", "", f"{sum(r['bytes'] for r in data['ranks']):,}")
    out.print(ranks)


def _print_bridge(bridge: dict[str, Any]) -> None:
    """Megatron-Bridge's run config: which provider built the model, where from, at what parallel sizes."""
    saved = bridge["saved_parallel"]
    sizes = " x ".join(f"{k}={saved[n] or 1}" for k, n in (("TP", "tensor"), ("PP", "pipeline"), ("EP", "expert"),
                                                           ("ETP", "expert_tensor")))
    table = Table(title="Megatron-Bridge run config", show_header=False)
    for k, v in [("provider", bridge["provider"]), ("saved at", sizes), ("hf_model_id", bridge["hf_model_id"]),
                 ("layer spec", bridge["transformer_layer_spec"]), ("run config", bridge["run_config"])]:
        table.add_row(k, str(v))
    out.print(table)


def inspect(path: str = typer.Argument(..., help="Checkpoint folder (HF, native or Megatron) or cached hub id."),
            as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
            all_tensors: bool = typer.Option(False, "--all", help="List every tensor (default: the first 40).")) -> None:
    """Format, architecture, config, tensors, parameters and bytes; Megatron: rank layout and vocab padding."""
    from ..converters.sources import open_checkpoint
    data = summary(open_checkpoint(path))
    if as_json:
        print_json(data)
        return
    padding = data["parameters"] - data["parameters_without_vocab_padding"]
    params = f"{data['parameters']:,}" + (f" ({data['parameters_without_vocab_padding']:,} without "
                                          f"{padding:,} in vocabulary padding)" if padding else "")
    head = Table(title=f"{data['path']}", show_header=False)
    scalar_info = [(k, v) for k, v in data["info"].items() if not isinstance(v, dict)]
    for k, v in [("format", data["format"]), ("architecture", f"{data['architecture']} ({data['family']} family)"),
                 *data["derived"].items(), ("parameters", params), ("bytes", f"{data['bytes']:,}"),
                 *scalar_info, *data["info"].get("params", {}).items()]:
        head.add_row(k, str(v))
    if data["unknown_config_fields"]:
        head.add_row("unmapped config", ", ".join(data["unknown_config_fields"]))
    if data["quantization"]:
        q = data["quantization"]
        head.add_row("quantization", f"{q['scheme']}: {q['quantized_tensors']} tensors "
                     f"({', '.join(q['codecs'])}), {q['quantized_bytes']:,} bytes quantized, "
                     f"{q['unquantized_bytes']:,} not")
        if q["left_unquantized_by_config"]:
            head.add_row("not quantized (config)", ", ".join(q["left_unquantized_by_config"]))
    out.print(head)
    if "megatron" in data["info"]:
        _print_megatron(data)
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
