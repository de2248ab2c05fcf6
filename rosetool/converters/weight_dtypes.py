"""Which dtypes a checkpoint's weights may be stored in, checked once for every tensor a plan reads.

A plain checkpoint stores floating-point weights in float32, float16, bfloat16 (or float64). Anything
else (float8 without its scales, integers) is either a quantization scheme, which a config announces
with `quantization_config`, or a damaged file: converted as is, one float8 tensor in an fp32 checkpoint
would come out as silently wrong weights. This is the one place that decides; quantized formats
relax it here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..errors import CheckpointError
from ..lazy_torch import torch

PLAIN = ("float32", "float16", "bfloat16", "float64")


def is_quantized(raw_config: Mapping[str, Any]) -> bool:
    return bool(raw_config.get("quantization_config"))


def check_weight_dtypes(tensors: Mapping[str, Any], keys: Iterable[str], raw_config: Mapping[str, Any],
                        architecture: str) -> None:
    """Refuse, by file and tensor name, the first planned tensor stored in a dtype outside PLAIN, unless
    the config declares a quantization scheme."""
    if is_quantized(raw_config):
        return
    plain = {getattr(torch, name) for name in PLAIN}
    for key in keys:
        meta = tensors[key]
        if meta.dtype not in plain:
            name = str(meta.dtype).removeprefix("torch.")
            raise CheckpointError(f"{meta.file}: tensor {key!r} is stored as {name}, not a dtype {architecture} "
                                  f"weights come in ({', '.join(PLAIN)}); a quantized checkpoint declares its "
                                  f"scheme in config.json's quantization_config; refused")


def refuse_unscaled_float8(tensors: Mapping[str, Any], config_file: str) -> None:
    """At open, before the plan would call its scales "unexpected": a float8 tensor in a checkpoint whose
    config declares no quantization scheme. Header dtype names only, so `inspect` stays free of torch."""
    for name, meta in tensors.items():
        if meta.dtype_name.startswith("float8"):
            raise CheckpointError(f"{meta.file}: tensor {name!r} is stored as {meta.dtype_name}, but {config_file} "
                                  f"has no quantization_config to say how it is scaled; refused")
