"""The file layer's view of a quantized checkpoint: each encoded weight appears as the one logical
tensor the spec maps (`...q_proj.weight`, bf16, [N, K]), and reading it decodes its stored parts
(FP8 codes + block scales, packed INT4 + group scales, MXFP4 blocks + exponents).

So no spec or family knows about quantization, and every family reads every scheme. The stored parts stay
known (`Encoded.parts`), so an HF -> HF export copies them byte for byte instead of decoding.
Everything checkable from headers (a missing or orphaned scale, a grid of the wrong shape) is refused
when the checkpoint is opened; scale values (NaN, Inf, zero, negative) when they are read, before the
tensor they scale is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...errors import CheckpointError
from ..safetensors_io import TensorInfo
from . import codecs
from .scheme import Scheme

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_E8M0 = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
# Names that only ever hold a scale or a shape: one left over after decoding belongs to no weight.
_COMPANION_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_shape", "weight_zero_point",
                       "_scales", ".scale")


@dataclass(frozen=True)
class Encoded:
    """One logical tensor stored as several: `parts` maps the suffix after `stem` to each stored tensor
    (`weight`, `weight_scale_inv`; `weight_packed`, `weight_scale`, `weight_shape`; `_blocks`, `_scales`)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    codec: str                                   # fp8-block | fp8-scaled | int4-group | mxfp4
    stem: str
    parts: tuple[tuple[str, TensorInfo], ...]
    block: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.parts)

    def part(self, suffix: str) -> TensorInfo:
        return dict(self.parts)[suffix]

    def renamed(self, key: str) -> list[tuple[str, TensorInfo]]:
        """The stored parts under the names they take when the logical tensor is written as `key`."""
        stem = key[:len(key) - (len(self.name) - len(self.stem))]
        return [(stem + suffix, info) for suffix, info in self.parts]


@dataclass
class QuantView:
    """What a quantized checkpoint holds beneath its logical tensors (`Checkpoint.info["quant"]`)."""
    scheme: Scheme
    encoded: dict[str, Encoded]
    read_stored: Callable[[str], torch.Tensor]

    def describe(self, total_bytes: int) -> dict[str, object]:
        """For `inspect`: the scheme, which tensors are encoded, and the bytes on each side."""
        quantized = sum(e.nbytes for e in self.encoded.values())
        codecs_used = sorted({e.codec for e in self.encoded.values()})
        return {"scheme": self.scheme.label, "quant_method": self.scheme.method,
                "block": list(self.scheme.block) if self.scheme.block else None,
                "scale_fmt": self.scheme.scale_fmt, "codecs": codecs_used,
                "quantized_tensors": len(self.encoded), "quantized_bytes": quantized,
                "unquantized_bytes": total_bytes - quantized,
                "left_unquantized_by_config": list(self.scheme.ignored)}


def _bad(info: TensorInfo, what: str) -> CheckpointError:
    return CheckpointError(f"{info.file}: tensor {info.name!r} {what}")


def _fp8_scale(scheme: Scheme, stem: str, weight: TensorInfo, tensors: dict[str, TensorInfo]) -> tuple[str, TensorInfo]:
    found = [s for s in ("weight_scale_inv", "weight_scale", "scale") if stem + s in tensors]
    if not found:
        raise _bad(weight, f"is {weight.dtype_name} but has no scale ({stem}weight_scale_inv or {stem}weight_scale)")
    if len(found) > 1:
        raise _bad(weight, f"has two scales ({', '.join(stem + s for s in found)})")
    return found[0], tensors[stem + found[0]]


def _fp8(scheme: Scheme, stem: str, weight: TensorInfo, tensors: dict[str, TensorInfo],
         out: torch.dtype) -> Encoded:
    if weight.dtype != torch.float8_e4m3fn:
        raise _bad(weight, f"is {weight.dtype_name}; the scheme stores float8_e4m3fn")
    if len(weight.shape) != 2:
        raise _bad(weight, f"has shape {list(weight.shape)}; quantized weights are 2-D [out, in]")
    suffix, scale = _fp8_scale(scheme, stem, weight, tensors)
    allowed = _SCALE_DTYPES + (_E8M0 if scheme.scale_fmt == "ue8m0" else ())
    if scale.dtype not in allowed:
        raise _bad(scale, f"is {scale.dtype_name}; a scale is float32, bfloat16 or float16"
                   + (" (or e8m0 with scale_fmt ue8m0)" if scheme.scale_fmt else ""))
    parts = [("weight", weight), (suffix, scale)]
    if stem + "input_scale" in tensors:
        parts.append(("input_scale", tensors[stem + "input_scale"]))
    n, k = weight.shape
    got = tuple(scale.shape)
    if scheme.block is not None and got == codecs.block_grid((n, k), scheme.block):
        return Encoded(stem + "weight", out, (n, k), weight.file, "fp8-block", stem, tuple(parts), scheme.block)
    if got in ((), (1,)) or (got == (n, 1) and scheme.block is None):
        return Encoded(stem + "weight", out, (n, k), weight.file, "fp8-scaled", stem, tuple(parts))
    want = f"[{', '.join(map(str, codecs.block_grid((n, k), scheme.block)))}] (blocks of {list(scheme.block)})" \
        if scheme.block else f"one value or one per row [{n}, 1]"
    raise _bad(scale, f"has shape {list(got)}; for weight {stem}weight [{n}, {k}] the scheme needs {want}")


def _int4(scheme: Scheme, stem: str, packed: TensorInfo, tensors: dict[str, TensorInfo],
          read: Callable[[str], torch.Tensor], out: torch.dtype) -> Encoded:
    for need in ("weight_scale", "weight_shape"):
        if stem + need not in tensors:
            raise _bad(packed, f"has no {stem}{need}")
    if stem + "weight_zero_point" in tensors:
        raise _bad(tensors[stem + "weight_zero_point"], "is a zero point: asymmetric INT4 is not supported")
    scale, shape_t = tensors[stem + "weight_scale"], tensors[stem + "weight_shape"]
    if packed.dtype != torch.int32 or len(packed.shape) != 2:
        raise _bad(packed, f"is {packed.dtype_name} {list(packed.shape)}; packed INT4 is 2-D int32")
    if shape_t.shape != (2,) or shape_t.dtype not in (torch.int32, torch.int64):
        raise _bad(shape_t, f"is {shape_t.dtype_name} {list(shape_t.shape)}; expected two integers")
    n, k = (int(x) for x in read(shape_t.name).tolist())
    group = scheme.group or k
    if (n, math.ceil(k / 8)) != tuple(packed.shape):
        raise _bad(packed, f"has shape {list(packed.shape)}; weight_shape [{n}, {k}] packs into "
                   f"[{n}, {math.ceil(k / 8)}]")
    if tuple(scale.shape) != (n, math.ceil(k / group)) or scale.dtype not in _SCALE_DTYPES:
        raise _bad(scale, f"is {scale.dtype_name} {list(scale.shape)}; [{n}, {k}] in groups of {group} needs "
                   f"a float scale [{n}, {math.ceil(k / group)}]")
    parts = (("weight_packed", packed), ("weight_scale", scale), ("weight_shape", shape_t))
    return Encoded(stem + "weight", out, (n, k), packed.file, "int4-group", stem, parts, (1, group))


def _mxfp4(stem: str, blocks: TensorInfo, tensors: dict[str, TensorInfo], out: torch.dtype) -> Encoded:
    if stem + "_scales" not in tensors:
        raise _bad(blocks, f"has no {stem}_scales")
    scales = tensors[stem + "_scales"]
    if blocks.dtype != torch.uint8 or len(blocks.shape) < 3 or blocks.shape[-1] != 16:
        raise _bad(blocks, f"is {blocks.dtype_name} {list(blocks.shape)}; MXFP4 blocks are uint8 [.., groups, 16]")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise _bad(scales, f"is {scales.dtype_name} {list(scales.shape)}; blocks {list(blocks.shape)} need "
                   f"uint8 {list(blocks.shape[:-1])}")
    shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
    return Encoded(stem, out, shape, blocks.file, "mxfp4", stem, (("_blocks", blocks), ("_scales", scales)))


def _encoded(scheme: Scheme, tensors: dict[str, TensorInfo], read: Callable[[str], torch.Tensor],
             out: torch.dtype) -> dict[str, Encoded]:
    found: dict[str, Encoded] = {}
    for name, info in tensors.items():
        if scheme.method == "mxfp4" and name.endswith("_blocks"):
            enc = _mxfp4(name[:-len("_blocks")], info, tensors, out)
        elif scheme.ct_format == "pack-quantized" and name.endswith(".weight_packed"):
            enc = _int4(scheme, name[:-len("weight_packed")], info, tensors, read, out)
        elif info.dtype in FP8_DTYPES and name.endswith(".weight") and scheme.method != "mxfp4":
            enc = _fp8(scheme, name[:-len("weight")], info, tensors, out)
        else:
            continue
        found[enc.name] = enc
    return found


def _scale_values_ok(enc: Encoded, suffix: str, scale: torch.Tensor) -> None:
    """A scale must be a finite positive number (e8m0: any byte but 0xFF, its NaN)."""
    info = enc.part(suffix)
    if scale.dtype in _E8M0:
        if bool((scale.view(torch.uint8) == 0xFF).any()):
            raise _bad(info, "holds the e8m0 NaN (0xFF) as a scale")
        return
    s = scale.to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise _bad(info, "holds a NaN or infinite scale")
    if not bool((s > 0).all()):
        raise _bad(info, f"holds a zero or negative scale ({float(s.min())})")


def decode(enc: Encoded, read_stored: Callable[[str], torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """The logical tensor, exactly as the published formula defines it."""
    if enc.codec == "mxfp4":
        blocks, scales = read_stored(enc.part("_blocks").name), read_stored(enc.part("_scales").name)
        if bool((scales == 0xFF).any()):
            raise _bad(enc.part("_scales"), "holds the e8m0 NaN (0xFF) as a scale")
        return codecs.dequant_mxfp4(blocks, scales, enc.dtype)
    scale_suffix = next(s for s, _ in enc.parts if s not in ("weight", "weight_packed", "weight_shape", "input_scale"))
    scale = read_stored(enc.part(scale_suffix).name)
    _scale_values_ok(enc, scale_suffix, scale)
    if enc.codec == "int4-group":
        codes = codecs.unpack_int4(read_stored(enc.part("weight_packed").name), enc.shape[1])
        return codecs.dequant_groups(codes, scale, enc.block[1], enc.dtype)
    if scheme.scale_fmt == "ue8m0" and scale.dtype not in _E8M0:
        mantissa_bits = scale.to(torch.float32).view(torch.int32) & 0x7FFFFF
        if bool((mantissa_bits != 0).any()):
            raise _bad(enc.part(scale_suffix), "holds a scale that is not a power of two, but scale_fmt is ue8m0")
    codes = read_stored(enc.part("weight").name)
    if enc.codec == "fp8-block":
        return codecs.dequant_scaled(codes, scale, enc.block, enc.dtype)
    return codecs.dequant_scaled(codes, scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()), None,
                                 enc.dtype)


def _orphans(tensors: dict[str, TensorInfo], encoded: dict[str, Encoded]) -> None:
    used = {info.name for enc in encoded.values() for _, info in enc.parts}
    for name, info in tensors.items():
        if name in used:
            continue
        if info.dtype in FP8_DTYPES:
            raise _bad(info, f"is {info.dtype_name}, which only a quantized weight (with its scale) may be")
        if name.endswith(_COMPANION_SUFFIXES) or name.endswith(("_blocks", ".weight_packed")):
            raise _bad(info, "is a scale or packed part with no weight it belongs to")


def view(scheme: Scheme, tensors: dict[str, TensorInfo], read: Callable[[str], torch.Tensor],
         out: torch.dtype = torch.bfloat16) -> tuple[dict[str, object], Callable[[str], torch.Tensor], QuantView | None]:
    """Logical tensors and their reader; a scheme that encodes nothing (a stale config) reads as none."""
    encoded = _encoded(scheme, tensors, read, out)
    _orphans(tensors, encoded)
    if not encoded:   # a stale quantization_config over bf16 weights (left by some dequantizing scripts)
        return dict(tensors), read, None
    used = {info.name for enc in encoded.values() for _, info in enc.parts}
    logical: dict[str, object] = {k: v for k, v in tensors.items() if k not in used}
    logical.update(encoded)

    def read_logical(key: str) -> torch.Tensor:
        enc = encoded.get(key)
        return read(key) if enc is None else decode(enc, read, scheme)

    return logical, read_logical, QuantView(scheme, encoded, read)
