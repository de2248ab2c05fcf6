"""Writing quantized HF folders: `export-hf --quantize fp8 | fp8-channel`, and keeping a quantized
source's stored bytes when nothing about its encoding changes.

Both work on the plan, not on a family: every decoder Linear (a 2-D canonical `layers.*.weight` that is
not a norm or a router) is quantized; embeddings, lm_head, norms, routers, biases and anything the user
names with `--quantize-ignore` stay as they are. The plan lists the codes and scales up front, so the
writer lays out every byte range before a tensor is ready, and the same input gives the same bytes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import RosetoolError
from . import codecs
from .decode import QuantView
from .scheme import Scheme

METHODS = ("fp8", "fp8-channel")
FP8_BLOCK = (128, 128)
_KEPT_ROLES = ("norm", "router", "shared_gate")
# vLLM's tensor-parallel layout of each canonical projection (its fp8 loader wants whole blocks per rank)
_COLUMN = ("q", "k", "v", "q_b", "kv_b", "gate", "up")
_ROW = ("o", "down")


@dataclass(frozen=True)
class QuantizeRequest:
    method: str                         # fp8 | fp8-channel
    scale_fmt: str | None = None        # ue8m0 (fp8 only)
    ignore: tuple[str, ...] = ()        # fnmatch patterns over HF module names
    serve_tp: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RosetoolError(f"--quantize {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.scale_fmt not in (None, "ue8m0"):
            raise RosetoolError(f"--scale-fmt {self.scale_fmt!r}: the only scale format is ue8m0")
        if self.scale_fmt and self.method != "fp8":
            raise RosetoolError("--scale-fmt ue8m0 applies to --quantize fp8 (block scales) only")
        if self.serve_tp is not None and not 1 <= self.serve_tp <= 4096:
            raise RosetoolError(f"--serve-tp {self.serve_tp}: expected a tensor-parallel size from 1 to 4096")

    def matches(self, scheme: Scheme) -> bool:
        """A source already in this encoding is copied as stored, not requantized."""
        if self.method == "fp8":
            return scheme.method == "fp8" and scheme.block == FP8_BLOCK and scheme.scale_fmt == self.scale_fmt
        return scheme.ct_format == "float-quantized" and scheme.strategy == "channel"


def is_decoder_linear(canonical: str, shape: tuple[int, ...]) -> bool:
    role = canonical.split(".")
    return canonical.startswith("layers.") and role[-1] == "weight" and len(shape) == 2 \
        and not any(k in part for part in role for k in _KEPT_ROLES)


def _canonical_names(plan: Any) -> dict[str, str]:
    """Each written key's one canonical tensor, from the destination format's own mapping (a write the
    plan turned into a byte copy names only its source key)."""
    from ..plan import expand_format
    steps = expand_format(plan.spec, plan.spec.format(plan.dst_format), plan.config)
    return {s.key: s.sources[0] for s in steps if len(s.sources) == 1}


def _role(canonical: str) -> str:
    return canonical.split(".")[-2]


def _check_serve_tp(key: str, canonical: str, shape: tuple[int, int], tp: int, config: dict[str, Any]) -> None:
    """vLLM shards column-parallel rows and row-parallel input columns; FP8 blocks must not straddle ranks."""
    role = _role(canonical)
    bn, bk = FP8_BLOCK
    if role in _COLUMN:
        rows = shape[0]
        if role in ("k", "v") and config.get("num_kv_heads") and config["num_kv_heads"] < tp:
            rows = config.get("head_dim") or rows // config["num_kv_heads"]   # a KV head replicated per rank
        elif rows % tp:
            raise RosetoolError(f"--serve-tp {tp}: tensor {key!r} has {rows} output rows, which do not split "
                                f"over {tp} ranks")
        else:
            rows //= tp
        if rows % bn:
            raise RosetoolError(f"--serve-tp {tp}: tensor {key!r} splits into {rows} rows per rank, not whole "
                                f"FP8 blocks of {bn}; vLLM would refuse it at load")
    elif role in _ROW:
        cols = shape[1]
        if cols % tp or (cols // tp) % bk:
            raise RosetoolError(f"--serve-tp {tp}: tensor {key!r} has {cols} input columns, which split over "
                                f"{tp} ranks into {cols / tp:g} per rank, not whole FP8 blocks of {bk}; vLLM "
                                f"would refuse it at load")


@dataclass(frozen=True)
class Encoder:
    """How one planned tensor (dtype, shape as the plan computes it) becomes codes + scales."""
    key: str
    request: QuantizeRequest
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __call__(self, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        stem = self.key[:-len("weight")]
        if self.request.method == "fp8":
            q, inv = codecs.quant_fp8_block(t, FP8_BLOCK, self.request.scale_fmt == "ue8m0")
            return [(self.key, q), (stem + "weight_scale_inv", inv)]
        q, scale = codecs.quant_fp8_channel(t)
        return [(self.key, q), (stem + "weight_scale", scale)]

    def outputs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        stem = self.key[:-len("weight")]
        if self.request.method == "fp8":
            scale = (stem + "weight_scale_inv", torch.float32, codecs.block_grid(self.shape, FP8_BLOCK))
        else:
            scale = (stem + "weight_scale", self.dtype, (self.shape[0], 1))
        return [(self.key, codecs.FP8, self.shape), scale]


def _quantization_config(request: QuantizeRequest, kept: list[str]) -> dict[str, Any]:
    ignore = sorted(set(kept) | {"lm_head"})
    if request.method == "fp8":
        qc: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": ignore}
        if request.scale_fmt:
            qc["scale_fmt"] = request.scale_fmt
        return qc
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**fp8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**fp8, "strategy": "token", "dynamic": True, "observer": None},
                "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None}


def quantize_plan(plan: Any, request: QuantizeRequest) -> dict[str, Encoder]:
    """Rewrite `plan.outputs` so each decoder Linear is written as codes + scales; returns the encoder
    of each such key, and sets `plan.quantization_config`."""
    encoders: dict[str, Any] = {}
    kept: list[str] = []
    canonical_of = _canonical_names(plan)
    for group in plan.groups:
        for step in group.writes:
            canonical = canonical_of.get(step.key)
            module = step.key.removesuffix(".weight")
            if canonical is None or len(step.shape) != 2 or not step.key.endswith(".weight"):
                continue
            if not is_decoder_linear(canonical, step.shape) or any(fnmatch.fnmatch(module, p) for p in request.ignore):
                if not canonical.startswith("embed"):
                    kept.append(module)
                continue
            if request.serve_tp and request.method == "fp8":
                _check_serve_tp(step.key, canonical, step.shape, request.serve_tp, plan.config)
            encoders[step.key] = step.key
    planned = {key: (dtype, shape) for key, dtype, shape in plan.outputs}
    encoders = {key: Encoder(key, request, *planned[key]) for key in encoders}
    plan.outputs = [o for key, dtype, shape in plan.outputs
                    for o in (encoders[key].outputs() if key in encoders else [(key, dtype, shape)])]
    plan.quantization_config = _quantization_config(request, kept)
    return encoders


def keep_stored(plan: Any, quant: QuantView, source_keys: dict[str, str]) -> None:
    """HF -> HF with the encoding unchanged: each encoded tensor's stored parts are written under the
    destination's names, byte for byte (`plan.stored`), and the published quantization_config travels."""
    stored: dict[str, list[tuple[str, Any]]] = {}
    for group in plan.groups:
        for step in group.writes:
            alias = step.sources[0] if len(step.sources) == 1 else ""
            enc = quant.encoded.get(source_keys.get(alias[1:], "")) if alias.startswith("=") else None
            if enc is not None:
                stored[step.key] = enc.renamed(step.key)
    outputs = []
    for key, dtype, shape in plan.outputs:
        outputs += [(name, info.dtype, info.shape) for name, info in stored[key]] if key in stored \
            else [(key, dtype, shape)]
    plan.outputs = outputs
    plan.stored = stored
    plan.quantization_config = dict(quant.scheme.raw)


class EncodingSink:
    """Encodes the planned keys on their way into a sink (codes and scales written as two tensors)."""

    def __init__(self, inner: Any, encoders: dict[str, Encoder]):
        self._inner, self._encoders = inner, encoders

    def write(self, key: str, tensor: torch.Tensor) -> None:
        encode = self._encoders.get(key)
        for name, part in encode(tensor) if encode else [(key, tensor)]:
            self._inner.write(name, part)

    def copy(self, key: str, ranges: list[tuple[Path, int, int]]) -> None:
        if key not in self._encoders:
            self._inner.copy(key, ranges)
            return
        enc = self._encoders[key]
        data = bytearray()
        for path, start, length in ranges:
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                data += f.read(length)
        self.write(key, torch.frombuffer(data, dtype=enc.dtype).reshape(enc.shape))

    def write_rows(self, key: str, first: int, rows: torch.Tensor) -> None:
        if key in self._encoders:
            raise RosetoolError(f"--quantize: {key!r} is written expert by expert, which quantizing does not "
                                f"support yet; pass --quantize-ignore for it")
        self._inner.write_rows(key, first, rows)

    def close(self, complete: bool = True) -> None:
        self._inner.close(complete)
