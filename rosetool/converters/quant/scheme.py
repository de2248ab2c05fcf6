"""A checkpoint's `quantization_config`, read as data: which encoding its tensors use.

Three published families of configs reach users: `quant_method: fp8` (DeepSeek-V3/R1, Kimi-K2, MiniMax,
Qwen3 `-FP8`: block scales, or one scale per tensor), `compressed-tensors` (llm-compressor: FP8 per tensor,
channel or block as `float-quantized`; INT4 groups as `pack-quantized`, Kimi-K2-Thinking) and `mxfp4`
(GPT-OSS experts). The scheme only says what to expect; every tensor is then checked against it by name
in `decode`, so a config that lies is caught at the tensor it lies about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...errors import CheckpointError

METHODS = ("fp8", "compressed-tensors", "mxfp4")
CT_FORMATS = ("float-quantized", "naive-quantized", "pack-quantized", "dense")


@dataclass(frozen=True)
class Scheme:
    method: str                                   # one of METHODS
    block: tuple[int, int] | None = None          # FP8 block [rows, cols] of one scale
    scale_fmt: str | None = None                  # "ue8m0": power-of-two scales
    ct_format: str | None = None                  # compressed-tensors format
    strategy: str | None = None                   # compressed-tensors weight strategy (tensor/channel/block/group)
    group: int | None = None                      # INT4 group size
    num_bits: int | None = None
    ignored: tuple[str, ...] = ()                 # modules the config says it left unquantized
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)   # as published, kept on HF -> HF

    @property
    def label(self) -> str:
        """A short human name: `fp8 block 128x128 (ue8m0)`, `compressed-tensors int4 group 32`."""
        if self.method == "fp8":
            kind = f"block {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
            return f"fp8 {kind}" + (f" ({self.scale_fmt})" if self.scale_fmt else "")
        if self.method == "mxfp4":
            return "mxfp4 (e2m1, e8m0 scales per 32)"
        what = f"int{self.num_bits}" if self.ct_format == "pack-quantized" else f"{self.ct_format}"
        how = f"{self.strategy} {self.group}" if self.group else (self.strategy or "")
        return f"compressed-tensors {what} {how}".strip()

    def is_ignored(self, module: str) -> bool:
        """Whether `module` (an HF module name, e.g. `lm_head`) is listed as left unquantized."""
        for rule in self.ignored:
            if rule.startswith("re:"):
                if re.match(rule[3:], module):
                    return True
            elif module == rule or module.endswith("." + rule) or rule in module.split("."):
                return True
        return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20


def _names(qc: Mapping[str, Any], keys: tuple[str, ...], where: str) -> tuple[str, ...]:
    out: list[str] = []
    for k in keys:
        v = qc.get(k)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise CheckpointError(f"{where}: quantization_config.{k} must be a list of module names")
        out += v
    return tuple(out)


def _fp8(qc: Mapping[str, Any], where: str) -> Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config fmt {fmt!r} is not supported (only e4m3)")
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(map(_positive_int, block))):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size {block!r} is not two positive integers")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise CheckpointError(f"{where}: quantization_config.scale_fmt {scale_fmt!r} is not supported (only ue8m0)")
    return Scheme("fp8", tuple(block) if block else None, scale_fmt,
                  ignored=_names(qc, ("modules_to_not_convert", "ignored_layers"), where), raw=qc)


def _compressed(qc: Mapping[str, Any], where: str) -> Scheme:
    fmt = qc.get("format")
    if fmt not in CT_FORMATS:
        raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                              f"(supported: {', '.join(CT_FORMATS)})")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError(f"{where}: quantization_config.config_groups must map names to objects")
    weights = [g.get("weights") for g in groups.values() if isinstance(g.get("weights"), dict)]
    if len({(w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("group_size")) for w in weights}) > 1:
        raise CheckpointError(f"{where}: compressed-tensors config_groups with different weight schemes "
                              f"are not supported")
    w = weights[0] if weights else {}
    if w.get("symmetric") is False:
        raise CheckpointError(f"{where}: asymmetric compressed-tensors weights (zero points) are not supported")
    bits = w.get("num_bits")
    kind = w.get("type")
    if fmt == "pack-quantized" and (kind != "int" or bits != 4):
        raise CheckpointError(f"{where}: pack-quantized weights of type {kind!r} with {bits} bits are not "
                              f"supported (only int 4)")
    if fmt in ("float-quantized", "naive-quantized") and not (kind == "float" and bits == 8):
        raise CheckpointError(f"{where}: {fmt} weights of type {kind!r} with {bits} bits are not supported "
                              f"(only float 8)")
    strategy = w.get("strategy")
    group = w.get("group_size")
    if strategy == "group" and not _positive_int(group):
        raise CheckpointError(f"{where}: compressed-tensors group_size {group!r} is not a positive integer")
    block = w.get("block_structure")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and all(map(_positive_int, block))):
        raise CheckpointError(f"{where}: compressed-tensors block_structure {block!r} is not two positive integers")
    return Scheme("compressed-tensors", tuple(block) if strategy == "block" else None, ct_format=fmt,
                  strategy=strategy, group=group if strategy == "group" else None, num_bits=bits,
                  ignored=_names(qc, ("ignore",), where), raw=qc)


def read_scheme(raw_config: Mapping[str, Any], where: str) -> Scheme | None:
    """The scheme a config declares, or None for an unquantized checkpoint; an unknown or malformed one
    is refused by name (silently reading codes as weights would give garbage)."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(qc, where)
    if method == "compressed-tensors":
        return _compressed(qc, where)
    if method == "mxfp4":
        return Scheme("mxfp4", ignored=_names(qc, ("modules_to_not_convert",), where), raw=qc)
    raise CheckpointError(f"{where}: quantization_config quant_method {method!r} is not supported "
                          f"(supported: {', '.join(METHODS)}); dequantize it with its own tool first")

