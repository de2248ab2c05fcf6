"""The conversion entry points the CLI, the runtime and the benchmarks share."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..dtypes import DTYPE_NAMES, parse_dtype
from ..errors import RosetoolError
from .config_map import transformers_major, unknown_fields, write_config
from .execute import execute
from .finite import scan_alongside
from .megatron import FORMATS as MEGATRON_FORMATS, make_writer as megatron_writer
from .outdir import atomic_output
from .plan import Plan, make_plan
from .quant.encode import Encoder, EncodingSink, QuantizeRequest, keep_stored, quantize_plan
from .sinks import DictSink, FolderSink
from .sources import NATIVE_MARKER, Checkpoint, open_checkpoint



@dataclass
class ConvertResult:
    src: str
    dst: str
    src_format: str
    dst_format: str
    architecture: str
    num_tensors: int
    nbytes: int
    seconds: float
    unknown_config: list[str] = field(default_factory=list)


def _hf_config(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, Any]:
    """config.json in the spelling the installed transformers (and so vLLM) reads; written directly,
    since importing transformers to build it would cost seconds per conversion."""
    spec, fmt = ckpt.spec, ckpt.spec.format("hf")
    dtype_key = "dtype" if transformers_major() >= 5 else "torch_dtype"
    return {"architectures": [spec.architecture], "model_type": spec.model_type,
            **write_config(fmt, ckpt.config), **fmt.write,
            dtype_key: DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))}


def _native_config(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, Any]:
    return {"format": NATIVE_MARKER, "format_version": 1, "architecture": ckpt.spec.name,
            "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "config": ckpt.config}


def _generation_config(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config
    return {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}


CONFIG_WRITERS: dict[str, Callable[[Checkpoint, torch.dtype], dict[str, Any]]] = {
    "hf": _hf_config, "native": _native_config,
}


def write_folder(ckpt: Checkpoint, plan: Plan, folder: Path, dtype: torch.dtype | None,
                 max_shard_size: int | None, on_tensor: Callable[[int], None] | None,
                 encoders: dict[str, Encoder] | None = None) -> None:
    """Safetensors weights + config (+ a generation config derived from it when the source has none)."""
    sink = FolderSink(folder, plan.outputs, max_shard_size)
    target = EncodingSink(sink, encoders) if encoders else sink
    try:
        execute(plan, ckpt, target, dtype, on_tensor)
    except BaseException:
        sink.close(complete=False)
        raise
    sink.close()
    model_dtypes = [d for _, d, _ in plan.outputs if d.is_floating_point and d.itemsize > 1]
    config = CONFIG_WRITERS[plan.dst_format](ckpt, model_dtypes[0] if model_dtypes else torch.float32)
    if plan.quantization_config:
        config["quantization_config"] = plan.quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if not (folder / "generation_config.json").exists() and _generation_config(ckpt):
        (folder / "generation_config.json").write_text(json.dumps(_generation_config(ckpt), indent=2) + "\n")


# Formats whose output is not one safetensors folder (Megatron rank files) register a writer here.
WRITERS: dict[str, Callable[..., None]] = {f: megatron_writer(ckpt_format=c) for f, c in MEGATRON_FORMATS.items()}


def convert(src: str | Path | Checkpoint, dst: str | Path, to: str, dtype: str | None = None,
            max_shard_size: int | None = None, force: bool = False, on_tensor: Callable[[int], None] | None = None,
            on_plan: Callable[[Plan], None] | None = None, params: dict[str, Any] | None = None,
            writer: Callable[..., None] | None = None, strict: bool = False,
            quantize: QuantizeRequest | None = None) -> ConvertResult:
    """Convert any readable checkpoint into format `to`, streaming, into a fresh folder `dst`.
    `writer` overrides the registered one (Megatron's, bound to a TP/PP layout); `strict` makes
    NaN/Inf in the source an error instead of a warning. A quantized source is dequantized unless it
    goes HF -> HF with no `dtype`, no other `quantize` and no adapter merged: then its stored bytes are kept."""
    start = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    if quantize is not None and to != "hf":
        raise RosetoolError("--quantize writes HF folders only (export-hf); Megatron and native hold bf16 weights")
    plan = make_plan(ckpt, to, torch_dtype, params)
    quant = ckpt.info.get("quant")
    encoders = None
    if quant is not None and to == "hf" and ckpt.format == "hf" and torch_dtype is None \
            and not ckpt.info.get("adapters") and (quantize is None or quantize.matches(quant.scheme)):
        keep_stored(plan, quant, plan.source_keys)
    elif quantize is not None:
        encoders = quantize_plan(plan, quantize)
    if on_plan:
        on_plan(plan)
    with atomic_output(Path(dst), force, ckpt.path) as tmp, \
            scan_alongside(ckpt, dict.fromkeys(plan.source_keys.values()), strict):
        if encoders:
            write_folder(ckpt, plan, tmp, torch_dtype, max_shard_size, on_tensor, encoders)
        else:
            (writer or WRITERS.get(to, write_folder))(ckpt, plan, tmp, torch_dtype, max_shard_size, on_tensor)
        for f in ckpt.extra_files:   # tokenizer, chat template, generation config: every format carries them
            shutil.copy2(f, tmp / f.name)
    fmt = ckpt.spec.format(ckpt.format)
    return ConvertResult(str(ckpt.path), str(dst), ckpt.format, to, ckpt.spec.name, len(plan.outputs), plan.nbytes,
                         time.perf_counter() - start, unknown_fields(fmt, ckpt.raw_config))


def export_hf(src: str | Path, dst: str | Path, **kwargs: Any) -> ConvertResult:
    """Any supported source -> an HF folder that transformers and vLLM load as is."""
    return convert(src, dst, "hf", **kwargs)


def load_state(src: str | Path | Checkpoint, to: str = "native",
               dtype: torch.dtype | None = None) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Convert in memory (the runtime loads any format this way)."""
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    plan = make_plan(ckpt, to, dtype)
    sink = DictSink()
    execute(plan, ckpt, sink, dtype)
    return ckpt, sink.tensors
