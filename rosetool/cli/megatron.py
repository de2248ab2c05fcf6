"""`rosetool convert hf-to-megatron`, `convert megatron-to-hf` and `reshard` (registered by cli/app.py)."""

from __future__ import annotations

from collections.abc import Collection
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
BridgeOpt = typer.Option(False, "--bridge", help="Megatron-Bridge's layout: iter_0000000/ with run_config.yaml "
                         "(the model provider Bridge builds from), metadata.json and tokenizer/, no common.pt; "
                         "implies --format torch_dist.")
VocabOpt = typer.Option(None, "--vocab-size", help="HF vocabulary size to trim the padded Megatron vocabulary "
                        "to, for checkpoints rosetool did not write (default: the one recorded, else no trim).")


def _run(src: str | Checkpoint, dst: Path, to: str, dtype: str | None, force: bool, as_json: bool, strict: bool,
         layout: Layout | None = None, max_shard_size: str | None = None, tokenizer: str | None = None,
         adapters: list[str] | None = None, **writer_args: object) -> ConvertResult:
    params: dict[str, object] | None = {"tensor_parallel": layout.tp} if layout else None
    if writer_args.get("bridge") and layout:    # the vocabulary as Bridge's import leaves it
        from ..converters.megatron.bridge import vocab_rows
        from ..converters.sources import open_checkpoint
        src = src if not isinstance(src, str) else open_checkpoint(src)
        params = {**(params or {}), "padded_vocab_size": vocab_rows(src.config["vocab_size"], layout.tp)}
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
                   ckpt_format: str | None = typer.Option(None, "--format", help="torch (one file per TP/PP rank; "
                                                          "the default) or torch_dist (global tensors, MoE experts "
                                                          "included; TP/PP/EP only set vocab padding and args)."),
                   te_layout: bool = typer.Option(False, "--te-layout", help="Transformer Engine keys "
                                                  "(norms fused into linear_qkv / linear_fc1); torch_dist always "
                                                  "uses them for dense layers, and with this flag an MoE layer "
                                                  "keeps its own pre-MLP norm as TE's spec does."),
                   bridge: bool = BridgeOpt,
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
    ckpt_format = ckpt_format or ("torch_dist" if bridge else "torch")
    if ckpt_format not in ("torch", "torch_dist"):
        raise RosetoolError(f"--format {ckpt_format}: choose torch or torch_dist")
    if bridge and ckpt_format != "torch_dist":
        raise RosetoolError("--bridge writes Megatron-Bridge's torch_dist layout; it excludes --format torch")
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
        # Transformer Engine names by default (MLA too); an MoE layer's pre-MLP norm as the local spec keys it
        # unless --te-layout
        te_names = te_layout or "megatron_dist_local" in src.spec.formats
        to = dist_layout(src.spec.formats, "megatron_te" if te_names else "megatron")
    _run(src, dst, to, dtype, force, as_json, strict, Layout(tp, pp, ep), adapters=adapter, ckpt_format=ckpt_format,
         **({"bridge": True} if bridge else {}))


def dist_layout(formats: Collection[str], layout: str) -> str:
    """The torch_dist key layout for a torch-format one: MoE and MLA specs have their own (local or Transformer
    Engine names), dense layers key as TE does under either spec."""
    if layout.startswith("megatron_dist"):
        return layout
    te = layout == "megatron_te"
    if "megatron_dist_local" in formats:
        return "megatron_dist" if te else "megatron_dist_local"
    if "megatron_dist" in formats:
        return "megatron_dist_te" if te and "megatron_dist_te" in formats else "megatron_dist"
    return "megatron_te"


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
            vocab_size: int | None = VocabOpt, dtype: str | None = DtypeOpt, bridge: bool = BridgeOpt,
            force: bool = ForceOpt, as_json: bool = JsonOpt, strict: bool = StrictOpt,
            adapter: list[str] | None = AdapterOpt) -> None:
    """Megatron checkpoint -> the same model at another TP/PP/EP layout (same key layout, same iteration).

    The output is torch format, or with --bridge Megatron-Bridge's torch_dist layout."""
    ckpt = _open(src, vocab_size)
    iteration = ckpt.info.get("iteration", "release")
    if bridge:
        if ckpt.format == "megatron_legacy":
            raise RosetoolError(f"{ckpt.path}: legacy Megatron-LM keys (language_model.*) have no torch_dist "
                                f"layout; reshard to torch format first")
        to = dist_layout(ckpt.spec.formats, ckpt.format)
        _run(ckpt, dst, to, dtype, force, as_json, strict, Layout(tp, pp, ep), iteration=iteration,
             ckpt_format="torch_dist", bridge=True)
        return
    # the output is torch format, in the spec torch_dist's names came from
    to = {"megatron_dist": "megatron_te", "megatron_dist_local": "megatron",
          "megatron_dist_te": "megatron_te"}.get(ckpt.format, ckpt.format)
    _run(ckpt, dst, to, dtype, force, as_json, strict, Layout(tp, pp, ep), adapters=adapter, iteration=iteration)
