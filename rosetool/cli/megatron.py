"""`rosetool convert hf-to-megatron`, `convert megatron-to-hf` and `reshard` (registered by cli/app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..converters.megatron import Layout, is_megatron, make_writer, open_megatron
from ..converters.megatron.layout import TRACKER
from ..errors import RosetoolError
from .adapter_options import AdapterOpt, AdaptersOnlyOpt
from .convert import (Dst, DtypeOpt, ForceOpt, JsonOpt, ShardOpt, Src, StrictOpt, TokenizerOpt,
                      run_adapter_conversion, run_conversion)

if TYPE_CHECKING:
    from ..converters.api import ConvertResult
    from ..converters.sources import Checkpoint

TpOpt = typer.Option(1, "--tp", min=1, help="Tensor-parallel size of the output.")
PpOpt = typer.Option(1, "--pp", min=1, help="Pipeline-parallel size of the output (layers split evenly).")
EpOpt = typer.Option(1, "--ep", min=1, help="Expert-parallel size of the output (MoE models: experts split "
                     "evenly; experts are cut over TP like Megatron-LM's default expert tensor parallelism).")
VocabOpt = typer.Option(None, "--vocab-size", help="HF vocabulary size to trim the padded Megatron vocabulary "
                        "to, for checkpoints rosetool did not write (default: the one recorded, else no trim).")


def _run(src: str | Checkpoint, dst: Path, to: str, dtype: str | None, force: bool, as_json: bool, strict: bool,
         layout: Layout | None = None, max_shard_size: str | None = None, tokenizer: str | None = None,
         adapters: list[str] | None = None, **writer_args: object) -> ConvertResult:
    params = {"tensor_parallel": layout.tp} if layout else None
    writer = make_writer(layout, **writer_args) if layout else None
    return run_conversion(src, dst, to, dtype, max_shard_size, force, as_json, params, writer, tokenizer,
                          strict=strict, adapters=adapters)


def _open(src: str, vocab_size: int | None) -> Checkpoint:
    from ..converters.sources import resolve_source
    path = resolve_source(src)
    if not is_megatron(path):
        raise RosetoolError(f"{path}: not a Megatron checkpoint (no {TRACKER}, mp_rank_* folders or "
                            f"torch_dist .metadata)")
    return open_megatron(path, vocab_size)


def hf_to_megatron(src: str = Src, dst: Path = Dst, tp: int = TpOpt, pp: int = PpOpt, ep: int = EpOpt,
                   ckpt_format: str = typer.Option("torch", "--format", help="torch (one file per TP/PP rank) or "
                                                   "torch_dist (global tensors, MoE experts included; TP/PP/EP only set vocab padding and args)."),
                   te_layout: bool = typer.Option(False, "--te-layout", help="Transformer Engine keys "
                                                  "(norms fused into linear_qkv / linear_fc1); torch_dist always "
                                                  "uses them."),
                   legacy: bool = typer.Option(False, "--legacy", help="Legacy Megatron-LM model keys "
                                               "(language_model.*), torch format only."),
                   dtype: str | None = DtypeOpt, force: bool = ForceOpt, as_json: bool = JsonOpt,
                   strict: bool = StrictOpt, adapter: list[str] | None = AdapterOpt,
                   adapters_only: bool = AdaptersOnlyOpt) -> None:
    """HF folder (or any readable checkpoint) -> Megatron-LM checkpoint at the given TP/PP/EP layout.

    With --adapters-only, the --adapter (HF PEFT, on SRC) -> Megatron-Bridge's LoRA layout at --tp/--pp
    (torch format): q/k/v and gate/up adapters become the fused layer's, A concatenated and B
    block-diagonal, exactly.

    Families: GPT-2, the Llama family, sequential GPT-NeoX (partial rotary), Phi-3/Phi-4 (partial rotary),
    GLM (GlmForCausalLM: q/k/v biases, interleaved partial rotary), the MoE family (Mixtral, Qwen2-MoE,
    Qwen3-MoE) and DeepSeek-V2/V3 (megatron-core's multi-latent attention; torch_dist in Transformer
    Engine names).

    Refused, each with one line naming what megatron-core 0.16.1's GPTModel lacks: GPT-J, Phi-1/2 and
    parallel-residual GPT-NeoX (no parallel attention + MLP block); Gemma 1 (no embedding scale by
    sqrt(hidden)); Gemma 2 (no logit soft-capping, no sandwich norms); Gemma 3 and GLM-4-0414 (no sandwich
    norms); a sliding window shorter than max_position_embeddings (Mistral, Phi-3: the local attention's
    fused softmax drops it); OLMoE (q/k norm over all heads); biases on the attention output but not the
    MLP or the reverse, and activations other than GELU and SwiGLU (Megatron-LM's args cannot say them);
    DeepSeek with attention biases, raw (unnormalised) sigmoid weights, expert-group
    scores other than megatron-core's sum of the best top-k // topk_group, or rms_norm_eps other than 1e-6.
    """
    if ckpt_format not in ("torch", "torch_dist"):
        raise RosetoolError(f"--format {ckpt_format}: choose torch or torch_dist")
    if legacy and (te_layout or ckpt_format == "torch_dist"):
        raise RosetoolError("--legacy is the torch-format legacy model; it excludes --te-layout and torch_dist")
    if Path(src).is_dir() and is_megatron(Path(src)):
        raise RosetoolError(f"{src} is already a Megatron checkpoint: use `rosetool reshard` to change its layout")
    te = te_layout or ckpt_format == "torch_dist"
    to = "megatron_te" if te else "megatron_legacy" if legacy else "megatron"
    if adapters_only:
        if ckpt_format != "torch" or legacy:
            raise RosetoolError("--adapters-only writes torch-format rank files in megatron-core's names: "
                                "not with --format torch_dist or --legacy")
        run_adapter_conversion(src, adapter, dst, to, force, as_json, tp=tp, pp=pp, ep=ep)
        return
    if ckpt_format == "torch_dist":    # MoE specs have torch_dist's own expert layout
        from ..converters.sources import open_checkpoint
        src = open_checkpoint(src)
        to = "megatron_dist" if "megatron_dist" in src.spec.formats else to
    _run(src, dst, to, dtype, force, as_json, strict, Layout(tp, pp, ep), adapters=adapter, ckpt_format=ckpt_format)


def megatron_to_hf(src: str = Src, dst: Path = Dst, vocab_size: int | None = VocabOpt,
                   dtype: str | None = DtypeOpt, max_shard_size: str | None = ShardOpt,
                   tokenizer: str | None = TokenizerOpt, force: bool = ForceOpt, as_json: bool = JsonOpt,
                   strict: bool = StrictOpt, adapter: list[str] | None = AdapterOpt,
                   adapters_only: bool = AdaptersOnlyOpt) -> None:
    """Megatron checkpoint (torch or torch_dist, any TP/PP) -> HF folder, padded vocabulary trimmed.

    With --adapters-only, the --adapter (a Megatron LoRA adapter on SRC) -> an HF PEFT folder that
    PeftModel.from_pretrained and vLLM's --enable-lora load.
    """
    if adapters_only:
        run_adapter_conversion(_open(src, vocab_size), adapter, dst, "hf", force, as_json)
        return
    _run(_open(src, vocab_size), dst, "hf", dtype, force, as_json, strict, max_shard_size=max_shard_size,
         tokenizer=tokenizer, adapters=adapter)


def reshard(src: str = Src, dst: Path = Dst, tp: int = TpOpt, pp: int = PpOpt, ep: int = EpOpt,
            vocab_size: int | None = VocabOpt, dtype: str | None = DtypeOpt, force: bool = ForceOpt,
            as_json: bool = JsonOpt, strict: bool = StrictOpt, adapter: list[str] | None = AdapterOpt) -> None:
    """Megatron checkpoint -> the same model at another TP/PP/EP layout (same key layout, same iteration)."""
    ckpt = _open(src, vocab_size)
    iteration = ckpt.info.get("iteration", "release")
    # the output is torch format, in the spec torch_dist's names came from
    to = {"megatron_dist": "megatron_te", "megatron_dist_local": "megatron"}.get(ckpt.format, ckpt.format)
    _run(ckpt, dst, to, dtype, force, as_json, strict, Layout(tp, pp, ep), adapters=adapter, iteration=iteration)
