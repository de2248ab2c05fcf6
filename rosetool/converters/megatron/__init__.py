"""Megatron-LM checkpoints (torch and torch_dist formats): read, write and reshard without Megatron.

`sources` and `api` register the entry points below; the modules behind them are imported lazily
because they build on `sources` themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .layout import SINGLE, Layout, is_megatron

if TYPE_CHECKING:
    from ..sources import Checkpoint

# key layout -> the checkpoint format that holds it (megatron_dist: torch_dist MoE, experts stacked globally;
# megatron_dist_te: the same with Transformer Engine's own pre-MLP norm in MoE layers)
FORMATS = {"megatron": "torch", "megatron_te": "torch", "megatron_legacy": "torch", "megatron_dist": "torch_dist",
           "megatron_dist_local": "torch_dist", "megatron_dist_te": "torch_dist"}


def open_megatron(path: Path, vocab_size: int | None = None) -> Checkpoint:
    """Tokenizer files and the chat template sit beside the iteration folders (rosetool's layout) or in
    the iteration's `tokenizer/` (Megatron-Bridge's), so HF -> Megatron -> HF keeps them byte for byte."""
    from ..sources import _carried_files
    from .layout import is_nemo2, is_torch_dist, iteration_dir
    nemo = is_nemo2(path)
    folder = path / "context" if nemo else iteration_dir(path)[0]
    if nemo or is_torch_dist(folder):
        from .dist import open_megatron_dist
        ckpt = open_megatron_dist(path, vocab_size)
    else:
        from .reader import open_megatron_torch
        ckpt = open_megatron_torch(path, vocab_size)
    ckpt.extra_files = _carried_files(path) or _saved_tokenizer(folder, "nemo_tokenizer" if nemo else "tokenizer")
    return ckpt


def _saved_tokenizer(folder: Path, name: str) -> list[Path]:
    """Megatron-Bridge's `iter_N/tokenizer/` (NeMo 2's `context/nemo_tokenizer/`); a symlink there could
    lead anywhere, so it is refused."""
    from ...errors import CheckpointError
    from ..sources import _carried_files
    tokenizer = folder / name
    if tokenizer.is_symlink():
        raise CheckpointError(f"{tokenizer}: a symlink; refused (tokenizer files must be inside the checkpoint)")
    return _carried_files(tokenizer) if tokenizer.is_dir() else []


def make_writer(layout: Layout = SINGLE, ckpt_format: str = "torch", **kwargs: Any) -> Callable[..., None]:
    """An `api.WRITERS` entry; TP=1, PP=1, torch format unless the Megatron CLI asks otherwise. The writer's
    module is imported when it first writes: `api` builds these entries at import, and torch_dist's writer
    pulls in torch.distributed.checkpoint (about a second), which an HF -> native conversion never needs."""
    def write(*args: Any, **more: Any) -> None:
        if ckpt_format == "torch_dist":
            from .dist_writer import write_megatron_dist as writer
        else:
            from .writer import write_megatron as writer
        writer(*args, layout=layout, **kwargs, **more)
    return write


__all__ = ["FORMATS", "Layout", "is_megatron", "make_writer", "open_megatron"]
