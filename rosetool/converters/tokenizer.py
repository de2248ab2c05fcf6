"""Tokenizer files for HF exports: a Megatron or native checkpoint carries none, and vLLM and
`AutoTokenizer` need them beside the weights.

The tokenizer is loaded once with transformers to count its tokens: a vocabulary larger than the
embedding would index past it at the first rare token, so that is refused before any conversion.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RosetoolError
from .sources import TOKENIZER_FILES, Checkpoint, resolve_source


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in TOKENIZER_FILES)


def tokenizer_size(folder: Path) -> int:
    """Tokens the tokenizer can emit, added tokens included."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    try:
        return len(AutoTokenizer.from_pretrained(folder))
    except Exception as exc:
        raise RosetoolError(f"{folder}: transformers cannot load its tokenizer "
                            f"({str(exc).splitlines()[0][:200]})") from None


def attach_tokenizer(ckpt: Checkpoint, path_or_id: str) -> None:
    """Make `ckpt` carry the tokenizer files of `path_or_id` (and its generation config where it has none)."""
    folder = resolve_source(path_or_id)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not files:
        raise RosetoolError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...)")
    rows = int(ckpt.config["vocab_size"])
    size = tokenizer_size(folder)
    if size > rows:
        raise RosetoolError(f"{folder}: tokenizer has {size} tokens but {ckpt.path} has an embedding of {rows} "
                            f"rows; pick the tokenizer the model was trained with")
    kept = [f for f in ckpt.extra_files if f.name not in TOKENIZER_FILES]
    generation = folder / "generation_config.json"
    if generation.exists() and not any(f.name == generation.name for f in kept):
        kept.append(generation)
    ckpt.extra_files = kept + files
