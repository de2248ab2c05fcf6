"""Open a checkpoint wherever it lives: detect its format and architecture, index its tensors.

Opening reads headers only; tensor data is read one tensor at a time by the executor. Formats
register an opener here, so a new format adds a reader without touching the converter.
"""

from __future__ import annotations

import math
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import CheckpointError, RosetoolError
from ..mappings.spec import ArchSpec, get_spec, spec_for_hf
from .config_map import read_config
from .megatron import is_megatron, open_megatron
from ..lazy_torch import torch
from .safetensors_io import TensorInfo, dtype_code, read_header, read_tensor

NATIVE_MARKER = "rosetool-native"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class TensorMeta(Protocol):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


@dataclass
class Checkpoint:
    """A checkpoint opened for reading: where it is, what it is, and how to read each tensor."""
    path: Path
    format: str
    spec: ArchSpec
    raw_config: dict[str, Any]
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    read: Callable[[str], torch.Tensor]
    extra_files: list[Path] = field(default_factory=list)   # tokenizer/generation files to carry along
    info: dict[str, Any] = field(default_factory=dict)       # format-specific facts for `inspect`

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, TensorInfo) else t.dtype.itemsize * math.prod(t.shape)
                   for t in self.tensors.values())



def resolve_source(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is, or an HF hub id through the huggingface_hub cache (offline first)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such file or folder")
    from huggingface_hub import snapshot_download
    kwargs = dict(allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                  cache_dir=os.environ.get("HF_HUB_CACHE") or None)   # read now, not at import
    try:
        return Path(snapshot_download(text, local_files_only=True, **kwargs))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, **kwargs))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{text}: not a local folder and not in the huggingface_hub cache, and the hub "
                              f"could not be reached ({reason}); download it where you have network "
                              f"(hf download {text}) or pass a local folder") from None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None


def _safetensors_tensors(folder: Path) -> dict[str, TensorInfo] | None:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_load_json(index).get("weight_map", {}).values()))
        for f in files:
            if not (folder / f).exists():
                raise CheckpointError(f"{index}: lists shard {f}, which is missing")
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else \
            sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(folder / f)[0])
    return out


def _torch_bin_tensors(folder: Path) -> tuple[dict[str, TensorInfo], dict[str, torch.Tensor]] | None:
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        return None
    metas: dict[str, TensorInfo] = {}
    data: dict[str, torch.Tensor] = {}
    for f in files:
        state = load_torch_file(f)
        for k, t in state.items():
            if isinstance(t, torch.Tensor):
                metas[k] = TensorInfo(k, dtype_code(t.dtype), tuple(t.shape), f)
                data[k] = t
    return metas, data


def load_torch_file(path: Path) -> dict[str, Any]:
    """`torch.load` with weights_only (never arbitrary unpickling), memory-mapped where possible."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path}: refused an unsafe pickle (weights_only load failed: {first})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({str(exc).splitlines()[0][:160]})") from None


def _open_tensors(folder: Path) -> tuple[dict[str, TensorMeta], Callable[[str], torch.Tensor]]:
    st = _safetensors_tensors(folder)
    if st is not None:
        return st, lambda k: read_tensor(st[k])
    bins = _torch_bin_tensors(folder)
    if bins is not None:
        metas, data = bins
        return metas, data.__getitem__
    raise CheckpointError(f"{folder}: no weights found (*.safetensors or pytorch_model*.bin)")


def _carried_files(folder: Path) -> list[Path]:
    names = TOKENIZER_FILES + ("generation_config.json",)
    return [folder / n for n in names if (folder / n).exists()]


def open_hf(folder: Path) -> Checkpoint:
    raw = _load_json(folder / "config.json")
    spec = spec_for_hf(raw.get("architectures"), raw.get("model_type"), str(folder / "config.json"))
    config = read_config(spec, spec.format("hf"), raw, str(folder / "config.json"))
    tensors, read = _open_tensors(folder)
    return Checkpoint(folder, "hf", spec, raw, config, tensors, read, _carried_files(folder))


def open_native(folder: Path) -> Checkpoint:
    raw = _load_json(folder / "config.json")
    spec = get_spec(raw.get("architecture", ""))
    config = read_config(spec, spec.format("native"), raw.get("config", {}), str(folder / "config.json"))
    tensors, read = _open_tensors(folder)
    return Checkpoint(folder, "native", spec, raw, config, tensors, read, _carried_files(folder))


def _is_native(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.exists() and NATIVE_MARKER in cfg.read_text()[:200]


# (name, detector, opener); later issues add formats here.
OPENERS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Checkpoint]]] = [
    ("native", _is_native, open_native),
    ("megatron", is_megatron, open_megatron),
    ("hf", lambda p: (p / "config.json").exists(), open_hf),
]


def detect_format(path: Path) -> str:
    for name, detect, _ in OPENERS:
        if detect(path):
            return name
    raise CheckpointError(f"{path}: not a checkpoint rosetool knows (no config.json, no Megatron layout)")


def open_checkpoint(path_or_id: str | os.PathLike) -> Checkpoint:
    path = resolve_source(path_or_id)
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
    name = detect_format(path)
    opener = next(o for n, _, o in OPENERS if n == name)
    try:
        return opener(path)
    except RosetoolError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read {name} checkpoint ({exc})") from None
