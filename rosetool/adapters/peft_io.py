"""HF PEFT LoRA folders: `adapter_config.json` + `adapter_model.safetensors`, read and written.

PEFT saves `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per target
module, and a `modules_to_save` module's tensors whole (`base_model.model.lm_head.weight`). Each
module's r and lora_alpha come from `rank_pattern` / `alpha_pattern` (PEFT's suffix match) or the
defaults; scaling is alpha / r, or alpha / sqrt(r) with `use_rslora`. What rosetool cannot merge
exactly is refused by name: other PEFT types, DoRA's `lora_magnitude_vector`, LoRA on embeddings,
trained biases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..converters.safetensors_io import StreamWriter, read_header, read_tensor
from ..converters.sources import _load_json, load_torch_file
from .lora import Adapter, FusedPair, Pair, Scale, Stored

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
# config settings that change what the weights mean, each refused unless it has its neutral value
_REFUSED = {"use_dora": (False, "DoRA (use_dora: lora_magnitude_vector rescales each output row)"),
            "bias": ("none", "trained biases (bias != 'none')"),
            "lora_bias": (False, "a LoRA bias on lora_B (lora_bias)"),
            "layer_replication": (None, "layer_replication (layers duplicated by the adapter)"),
            "target_parameters": (None, "target_parameters (LoRA on raw parameters such as fused MoE experts)"),
            "trainable_token_indices": (None, "trainable_token_indices (new embedding rows)"),
            "use_qalora": (False, "QA-LoRA (use_qalora)")}


def is_peft(path: Path) -> bool:
    return (path / CONFIG).is_file()


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the module name as a dotted suffix."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)


def module_scale(config: dict[str, Any], module: str) -> Scale:
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    rank = ranks[r_key] if r_key is not None else config["r"]
    alpha = alphas[a_key] if a_key is not None else config["lora_alpha"]
    return Scale(alpha, rank, bool(config.get("use_rslora")))


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}: only LoRA adapters are supported")
    for field, (neutral, what) in _REFUSED.items():
        value = config.get(field)
        if value is not None and value != neutral and value not in ({}, []):
            raise CheckpointError(f"{path}: {what} is not supported; merge it with peft's merge_and_unload instead")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {name} must be a positive number, got {value!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise CheckpointError(f"{path}: {name} must be an object of module pattern -> number")


def _stored_tensors(folder: Path) -> dict[str, Stored]:
    if (folder / WEIGHTS).exists():
        infos, _ = read_header(folder / WEIGHTS)
        return {k: Stored(k, i.file, i.shape, lambda i=i: read_tensor(i)) for k, i in infos.items()}
    bin_file = folder / "adapter_model.bin"
    if bin_file.exists():
        state = load_torch_file(bin_file)
        return {k: Stored(k, bin_file, tuple(t.shape), lambda t=t: t) for k, t in state.items()
                if isinstance(t, torch.Tensor)}
    raise CheckpointError(f"{folder}: no {WEIGHTS} (or adapter_model.bin) beside {CONFIG}")


def read_peft(folder: Path) -> Adapter:
    """Pairs keyed by the HF weight they adapt (`<module>.weight`), each checked for its rank."""
    config = _load_json(folder / CONFIG)
    _check_config(config, folder / CONFIG)
    stored = _stored_tensors(folder)
    saved = config.get("modules_to_save") or []
    a_of, b_of, replace = {}, {}, {}
    for key, t in stored.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{t.file}: tensor {key!r} is not under {PREFIX!r}, as PEFT saves adapters")
        name = key[len(PREFIX):]
        if name.endswith(_A):
            a_of[name[:-len(_A)]] = t
        elif name.endswith(_B):
            b_of[name[:-len(_B)]] = t
        elif ".lora_magnitude_vector" in name:
            raise CheckpointError(f"{t.file}: tensor {key!r} is DoRA's magnitude vector; DoRA is not supported")
        elif ".lora_embedding_" in name:
            raise CheckpointError(f"{t.file}: tensor {key!r} is a LoRA on an embedding, which is not supported")
        elif any(name.rsplit(".", 1)[0] == m or name.rsplit(".", 1)[0].endswith("." + m) for m in saved):
            replace[name] = t
        else:
            raise CheckpointError(f"{t.file}: unexpected tensor {key!r} (neither lora_A/lora_B nor a "
                                  f"modules_to_save module of {CONFIG})")
    for module in sorted(a_of.keys() ^ b_of.keys()):
        have, lacks = (a_of, "lora_B") if module in a_of else (b_of, "lora_A")
        raise CheckpointError(f"{have[module].file}: tensor {PREFIX}{module} has no {lacks}")
    pairs = {}
    for module in sorted(a_of):
        a, b, scale = a_of[module], b_of[module], module_scale(config, module)
        if len(a.shape) != 2 or a.shape[0] != scale.rank:
            raise CheckpointError(f"{a.file}: rank mismatch: tensor {a.name!r} is {list(a.shape)}, "
                                  f"{CONFIG} gives {module} r={scale.rank}")
        pairs[module + ".weight"] = [Pair(a, b, scale)]
    return Adapter(folder, "hf", pairs, replace, bool(config.get("fan_in_fan_out")), config)


def _module_scales(fused: dict[str, FusedPair]) -> dict[str, Scale]:
    """One scale per module, as PEFT can say it: blocks of one scale, rank the whole R (alpha scaled
    by R / r, exact for plain LoRA with whole multiples)."""
    out = {}
    for key, pair in fused.items():
        scales = {s for _, s in pair.blocks}
        module, total = key.removesuffix(".weight"), pair.a.shape[0]
        if len(scales) != 1:
            raise CheckpointError(f"{module}: its fused blocks have different scalings {sorted(map(str, scales))}; "
                                  f"one PEFT module cannot hold them (merge the adapter instead)")
        (s,) = scales
        if total == s.rank:
            out[module] = s
        elif not s.rslora and total % s.rank == 0:
            out[module] = Scale(s.alpha * (total // s.rank), total)
        else:
            raise CheckpointError(f"{module}: rank {total} made of rank-{s.rank} blocks cannot keep its "
                                  f"{'rsLoRA ' if s.rslora else ''}scaling in one PEFT module")
    return out


def peft_config(scales: dict[str, Scale], base: str, fan_in_fan_out: bool,
                original: dict[str, Any] | None) -> dict[str, Any]:
    """The original config when it still says every module's scale; otherwise a new one naming each
    module in full (PEFT matches a target by its dotted suffix, a full name matches only itself)."""
    if original and all(module_scale(original, m) == s for m, s in scales.items()) \
            and not original.get("modules_to_save"):
        return original
    rslora = {s.rslora for s in scales.values()}
    if len(rslora) > 1:
        raise CheckpointError("modules mix rsLoRA and plain LoRA scaling; one PEFT config cannot hold both")
    counts: dict[tuple[float, int], int] = {}
    for s in scales.values():
        counts[(s.alpha, s.rank)] = counts.get((s.alpha, s.rank), 0) + 1
    alpha, rank = max(counts, key=counts.__getitem__)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": rank, "lora_alpha": alpha, "use_rslora": rslora.pop(),
            "target_modules": sorted(scales), "fan_in_fan_out": fan_in_fan_out,
            "rank_pattern": {m: s.rank for m, s in sorted(scales.items()) if s.rank != rank},
            "alpha_pattern": {m: s.alpha for m, s in sorted(scales.items()) if s.alpha != alpha},
            "bias": "none", "lora_dropout": 0.0, "modules_to_save": None, "inference_mode": True,
            "init_lora_weights": True, "use_dora": False}


def write_peft(folder: Path, fused: dict[str, FusedPair], base: str, fan_in_fan_out: bool,
               original: dict[str, Any] | None) -> int:
    """A PEFT folder transformers and vLLM load; returns the number of tensors written."""
    config = peft_config(_module_scales(fused), base, fan_in_fan_out, original)
    tensors = {}
    for key, pair in sorted(fused.items()):
        module = PREFIX + key.removesuffix(".weight")
        tensors[module + _A], tensors[module + _B] = pair.a, pair.b
    writer = StreamWriter(folder / WEIGHTS, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                          {"format": "pt"})
    try:
        for k, t in tensors.items():
            writer.write(k, t)
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close()
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return len(tensors)
