"""`rosetool convert ...` and `rosetool export-hf`: one runner, a command per direction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from ..converters.api import ConvertResult, convert
from ..converters.sinks import parse_size
from ..converters.sources import Checkpoint
from .fast_exit import exit_now_if_console
from .output import byte_progress, err, out, print_json

app = typer.Typer(help="Convert checkpoints between HF, native and Megatron layouts.", no_args_is_help=True)

Src = typer.Argument(..., help="Source checkpoint folder (or an HF hub id already in the local cache).")
Dst = typer.Argument(..., help="Destination folder; must not exist or be empty (see --force).")
DtypeOpt = typer.Option(None, "--dtype", help="Cast every tensor: float32, float16 or bfloat16 (default: keep).")
ShardOpt = typer.Option(None, "--max-shard-size", help="Split safetensors output, e.g. 5GB, 500MB (default: one file).")
ForceOpt = typer.Option(False, "--force", help="Replace a non-empty destination.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON.")


def run_conversion(src: str | Checkpoint, dst: Path, to: str, dtype: Optional[str], max_shard_size: Optional[str],
                   force: bool, as_json: bool, params: Optional[dict[str, Any]] = None,
                   writer: Optional[Callable[..., None]] = None) -> ConvertResult:
    """Shared by every direction: progress bar while streaming, a summary table at the end."""
    shard = parse_size(max_shard_size) if max_shard_size else None
    with byte_progress(f"converting to {to}") as (set_total, advance):
        result = convert(src, dst, to, dtype=dtype, max_shard_size=shard, force=force, on_tensor=advance,
                         on_plan=lambda plan: set_total(plan.nbytes), params=params, writer=writer)
    report(result, as_json)
    exit_now_if_console()
    return result


def report(result: ConvertResult, as_json: bool) -> None:
    if as_json:
        print_json(vars(result))
        return
    table = Table(title=f"{result.src_format} -> {result.dst_format}: {result.architecture}", show_header=False)
    rate = result.nbytes / max(result.seconds, 1e-9) / 1e6
    for k, v in [("source", result.src), ("destination", result.dst), ("tensors", result.num_tensors),
                 ("bytes", f"{result.nbytes:,}"), ("time", f"{result.seconds:.2f} s ({rate:,.0f} MB/s)")]:
        table.add_row(k, str(v))
    out.print(table)
    if result.unknown_config:
        err.print(f"[yellow]note:[/] config fields rosetool does not map (kept out of the output): "
                  f"{', '.join(result.unknown_config)}")


@app.command("hf-to-native")
def hf_to_native(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
                 max_shard_size: Optional[str] = ShardOpt, force: bool = ForceOpt, as_json: bool = JsonOpt) -> None:
    """HF folder (safetensors or pytorch_model.bin, sharded or not) -> native runtime folder."""
    run_conversion(src, dst, "native", dtype, max_shard_size, force, as_json)


@app.command("native-to-hf")
def native_to_hf(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
                 max_shard_size: Optional[str] = ShardOpt, force: bool = ForceOpt, as_json: bool = JsonOpt) -> None:
    """Native runtime folder -> HF folder (config, generation config, tokenizer, safetensors)."""
    run_conversion(src, dst, "hf", dtype, max_shard_size, force, as_json)


def export_hf(src: str = Src, dst: Path = Dst, dtype: Optional[str] = DtypeOpt,
              max_shard_size: Optional[str] = ShardOpt, force: bool = ForceOpt, as_json: bool = JsonOpt) -> None:
    """Any supported checkpoint -> an HF folder that transformers and vLLM load as is."""
    run_conversion(src, dst, "hf", dtype, max_shard_size, force, as_json)
