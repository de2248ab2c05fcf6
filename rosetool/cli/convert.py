"""`rosetool convert ...` and `rosetool export-hf`: one runner, a command per direction.

Converter modules import torch, so they are imported inside the commands: `--help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.table import Table

from ..errors import RosetoolError
from .adapter_options import AdapterOpt
from .help import examples, sub_app
from .fast_exit import exit_now_if_console
from .output import byte_progress, err, out, print_json

if TYPE_CHECKING:
    from ..converters.api import ConvertResult
    from ..converters.sources import Checkpoint

app = sub_app("Convert checkpoints between HF, native and Megatron layouts.")

Src = typer.Argument(..., help="Source checkpoint folder (or an HF hub id already in the local cache).")
Dst = typer.Argument(..., help="Destination folder; must not exist or be empty (see --force).")
DtypeOpt = typer.Option(None, "--dtype", help="Cast every tensor: float32, float16 or bfloat16 (default: keep).")
ShardOpt = typer.Option(None, "--max-shard-size", help="Split safetensors output, e.g. 5GB, 500MB (default: one file).")
ForceOpt = typer.Option(False, "--force", help="Replace a non-empty destination; a destination that is a "
                         "symlink has the link itself replaced, never what it points to.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")
StrictOpt = typer.Option(False, "--strict", help="Refuse a source with NaN/Inf weights (default: warn, naming them).")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Folder or cached hub id whose tokenizer files (and "
                            "generation_config.json, if the source has none) go into the output; its vocabulary "
                            "must fit the embedding.")


def open_expecting(src: str, expected: str) -> Checkpoint:
    """Open `src` and refuse a direction that does not match what it is (e.g. native-to-hf on an HF folder)."""
    from ..converters.sources import open_checkpoint
    ckpt = open_checkpoint(src)
    if ckpt.format != expected:
        raise RosetoolError(f"{ckpt.path} is already a {ckpt.format} checkpoint, not {expected}: "
                            f"use `rosetool convert {ckpt.format}-to-...` or `rosetool export-hf`")
    return ckpt


def run_conversion(src: str | Checkpoint, dst: Path, to: str, dtype: Optional[str], max_shard_size: Optional[str],
                   force: bool, as_json: bool, params: Optional[dict[str, Any]] = None,
                   writer: Optional[Callable[..., None]] = None, tokenizer: Optional[str] = None,
                   strict: bool = False, quantize: Any = None,
                   adapters: Optional[list[str]] = None) -> ConvertResult:
    """Shared by every direction: progress bar while streaming, a summary table at the end."""
    from ..converters.api import convert
    from ..converters.sinks import parse_size
    from ..converters.sources import open_checkpoint
    from ..converters.tokenizer import attach_tokenizer, has_tokenizer

    shard = parse_size(max_shard_size) if max_shard_size else None
    ckpt = src if not isinstance(src, str) else open_checkpoint(src)
    if tokenizer is not None:
        attach_tokenizer(ckpt, tokenizer)   # checked before a byte is converted
    if adapters:
        from ..adapters.merge import with_adapters
        from ..dtypes import parse_dtype
        ckpt = with_adapters(ckpt, adapters, parse_dtype(dtype))   # every adapter checked before a byte
    with byte_progress(f"converting to {to}") as (set_total, advance):
        result = convert(ckpt, dst, to, dtype=dtype, max_shard_size=shard, force=force, on_tensor=advance,
                         on_plan=lambda plan: set_total(plan.nbytes), params=params, writer=writer,
                         strict=strict, quantize=quantize)
    report(result, as_json)
    if to == "hf" and not has_tokenizer(Path(dst)):
        err.print(f"[yellow]warning:[/] {dst} has no tokenizer files; vLLM and AutoTokenizer need them: "
                  f"pass --tokenizer PATH_OR_HUB_ID", highlight=False, soft_wrap=True)
    exit_now_if_console()
    return result


def run_adapter_conversion(base: str | Checkpoint, adapters: Optional[list[str]], dst: Path, to: str,
                           force: bool, as_json: bool, **layout: int) -> None:
    """`--adapters-only`: the one adapter in the target's LoRA layout; `base` is the model it adapts."""
    from ..adapters.convert import convert_adapter
    from ..converters.megatron import Layout
    from ..converters.sources import open_checkpoint

    if len(adapters or ()) != 1:
        raise RosetoolError("--adapters-only converts exactly one --adapter")
    ckpt = base if not isinstance(base, str) else open_checkpoint(base)
    result = convert_adapter(ckpt, adapters[0], dst, to, force, Layout(**layout))
    report(result, as_json)


def report(result: ConvertResult, as_json: bool) -> None:
    if as_json:
        print_json(vars(result))
        return
    table = Table(title=f"{result.src_format} -> {result.dst_format}: {result.architecture}", show_header=False)
    nbytes = getattr(result, "nbytes", None)    # None: an adapter conversion, a few MB
    rate = f" ({nbytes / max(result.seconds, 1e-9) / 1e6:,.0f} MB/s)" if nbytes else ""
    rows = [("source", result.src), ("destination", result.dst), ("tensors", result.num_tensors)]
    rows += [("bytes", f"{nbytes:,}")] if nbytes else []
    for k, v in rows + [("time", f"{result.seconds:.2f} s{rate}")]:
        table.add_row(k, str(v))
    out.print(table)
    if getattr(result, "unknown_config", None):
        err.print(f"[yellow]note:[/] config fields rosetool does not map (kept out of the output): "
                  f"{', '.join(result.unknown_config)}")


@app.command("hf-to-native", **examples("rosetool convert hf-to-native ./llama ./llama-native",
                                        "rosetool convert hf-to-native ./llama ./native --dtype bfloat16"))
def hf_to_native(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
                 max_shard_size: Optional[str] = ShardOpt, force: bool = ForceOpt, as_json: bool = JsonOpt,
                 strict: bool = StrictOpt, adapter: Optional[list[str]] = AdapterOpt) -> None:
    """HF folder (safetensors or pytorch_model.bin, sharded or not) -> native runtime folder."""
    run_conversion(open_expecting(src, "hf"), dst, "native", dtype, max_shard_size, force, as_json, strict=strict,
                   adapters=adapter)


@app.command("native-to-hf", **examples("rosetool convert native-to-hf ./native ./hf-out",
                                        "rosetool convert native-to-hf ./native ./hf-out --tokenizer ./llama"))
def native_to_hf(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
                 max_shard_size: Optional[str] = ShardOpt, tokenizer: Optional[str] = TokenizerOpt,
                 force: bool = ForceOpt, as_json: bool = JsonOpt, strict: bool = StrictOpt,
                 adapter: Optional[list[str]] = AdapterOpt) -> None:
    """Native runtime folder -> HF folder (config, generation config, tokenizer, safetensors)."""
    run_conversion(open_expecting(src, "native"), dst, "hf", dtype, max_shard_size, force, as_json,
                   tokenizer=tokenizer, strict=strict, adapters=adapter)


QuantizeOpt = typer.Option(None, "--quantize", help="Write FP8 weights vLLM serves: fp8 (128x128 block scales, "
                           "DeepSeek/vLLM layout) or fp8-channel (compressed-tensors, per-channel scales). Every "
                           "decoder Linear is quantized; embeddings, lm_head, norms, routers and biases are kept.")
ScaleFmtOpt = typer.Option(None, "--scale-fmt", help="ue8m0: round fp8 block scales to powers of two "
                           "(DeepSeek-V3.1's scale_fmt).")
QuantizeIgnoreOpt = typer.Option(None, "--quantize-ignore", help="Keep modules matching this glob unquantized, "
                                 "e.g. '*.self_attn.*' (repeatable).")
ServeTpOpt = typer.Option(None, "--serve-tp", help="Check that every fp8 block weight splits into whole blocks "
                          "over this many vLLM tensor-parallel ranks; refuse the export otherwise.")


def export_hf(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
              max_shard_size: Optional[str] = ShardOpt, tokenizer: Optional[str] = TokenizerOpt,
              quantize: Optional[str] = QuantizeOpt, scale_fmt: Optional[str] = ScaleFmtOpt,
              quantize_ignore: Optional[list[str]] = QuantizeIgnoreOpt, serve_tp: Optional[int] = ServeTpOpt,
              force: bool = ForceOpt, as_json: bool = JsonOpt, strict: bool = StrictOpt,
              adapter: Optional[list[str]] = AdapterOpt) -> None:
    """Any supported checkpoint -> an HF folder that transformers and vLLM load as is. A quantized source
    (FP8, INT4, MXFP4) keeps its stored bytes unless --dtype (dequantize) or another --quantize is given."""
    request = None
    if quantize is not None:
        from ..converters.quant.encode import QuantizeRequest
        request = QuantizeRequest(quantize, scale_fmt, tuple(quantize_ignore or ()), serve_tp)
    elif scale_fmt or quantize_ignore or serve_tp:
        raise RosetoolError("--scale-fmt, --quantize-ignore and --serve-tp go with --quantize")
    run_conversion(src, dst, "hf", dtype, max_shard_size, force, as_json, tokenizer=tokenizer, strict=strict,
                   quantize=request, adapters=adapter)
