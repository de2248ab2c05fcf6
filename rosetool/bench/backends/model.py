"""Which folder a benchmark loads, and how a tokenizer becomes the workload's vocabulary."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rosetool.bench.backends.base import BackendConfig
from rosetool.bench.workload import Vocab
from rosetool.errors import RosetoolError


def resolve_model(cfg: BackendConfig) -> Path:
    """`--hf-model-id` through the hub cache, `--model` as a folder, else the embedded default."""
    if cfg.model is not None and cfg.hf_model_id:
        raise RosetoolError("give either --model or --hf-model-id, not both")
    if cfg.hf_model_id:
        from rosetool.converters.sources import resolve_source

        return Path(resolve_source(cfg.hf_model_id))
    if cfg.model is not None:
        if not cfg.model.is_dir():
            raise RosetoolError(f"--model {cfg.model}: no such folder")
        return cfg.model
    from rosetool.default_model import ensure_default_model

    return Path(ensure_default_model())


def model_label(cfg: BackendConfig) -> str:
    return cfg.hf_model_id or (str(cfg.model) if cfg.model else "default")


def hf_folder(path: Path, workdir: tempfile.TemporaryDirectory) -> Path:
    """A folder transformers can load: `path` itself, or a native/Megatron export into `workdir`."""
    from rosetool.converters.api import export_hf
    from rosetool.converters.sources import detect_format

    if detect_format(path) == "hf":
        return path
    dst = Path(workdir.name) / "hf"
    export_hf(path, dst)
    return dst


def make_vocab(tokenizer: Any, vocab_size: int | None) -> Vocab:
    """Random ids come from the model's embedding range minus special tokens, so none is EOS."""
    size = vocab_size or (len(tokenizer) if tokenizer is not None else 0)
    if size < 2:
        raise RosetoolError("cannot tell the model's vocabulary size for a random workload")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return Vocab(size=size, special_ids={i for i in special if i < size}, tokenizer=tokenizer)
