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
from .paths import inside
from .safetensors_io import TensorInfo, dtype_code, read_header, read_tensor, require_regular_file

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
        return sum(getattr(t, "nbytes", None) or t.dtype.itemsize * math.prod(t.shape)
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
    """A JSON object from a regular file; a list, a number, a folder or bad UTF-8 is one line."""
    require_regular_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:   # UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path}: cannot read JSON ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" object of tensor name -> shard file")
    return weight_map


def _safetensors_tensors(folder: Path) -> dict[str, TensorInfo] | None:
    """Every tensor of every shard, each stored once; with an index, exactly where `weight_map` says."""
    index = folder / "model.safetensors.index.json"
    weight_map = _weight_map(index) if index.exists() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for f in files:
            if not inside(folder, f, index).exists():
                raise CheckpointError(f"{index}: lists shard {f}, which is missing")
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").exists() else \
            sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(inside(folder, f, index if weight_map else folder))[0].items():
            if name in out:
                raise CheckpointError(f"{info.file}: tensor {name!r} is also stored in {out[name].file.name}")
            if weight_map is not None and weight_map.get(name) != f:
                where = f"maps it to {weight_map[name]}" if name in weight_map else "does not list it"
                raise CheckpointError(f"{info.file}: tensor {name!r} is stored here but {index.name} {where}")
            out[name] = info
    if weight_map is not None and weight_map.keys() - out.keys():
        name = sorted(weight_map.keys() - out.keys())[0]
        raise CheckpointError(f"{folder / weight_map[name]}: tensor {name!r} is missing "
                              f"({index.name} lists it in this shard)")
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
    """Tokenizer and generation files to copy; a symlink out of the source or a non-file is refused."""
    names = TOKENIZER_FILES + ("generation_config.json",)
    found = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    for n in found:
        require_regular_file(inside(folder, n, folder / n))
    return [folder / n for n in found]


def _decoded_tensors(folder: Path, raw: dict[str, Any]) -> tuple[dict[str, TensorMeta], Callable[[str], torch.Tensor],
                                                                 dict[str, Any]]:
    """The stored tensors, with quantized weights shown as the logical tensors they encode (decoded on
    read into the model's dtype), and what the quantization layer knows for `info`."""
    from .quant.scheme import read_scheme
    from .weight_dtypes import refuse_unscaled_float8
    where = folder / "config.json"
    scheme = read_scheme(raw, str(where))
    tensors, read = _open_tensors(folder)
    if scheme is None:
        refuse_unscaled_float8(tensors, str(where))
        return tensors, read, {}
    from .quant.decode import view
    dtype_name = raw.get("dtype") or raw.get("torch_dtype")
    dtype = getattr(torch, dtype_name) if dtype_name in ("bfloat16", "float16", "float32") else torch.bfloat16
    tensors, read, quant = view(scheme, tensors, read, dtype)
    return tensors, read, {"quant": quant} if quant else {}


def open_hf(folder: Path) -> Checkpoint:
    raw = _load_json(folder / "config.json")
    spec = spec_for_hf(raw.get("architectures"), raw.get("model_type"), str(folder / "config.json"))
    tensors, read, info = _decoded_tensors(folder, raw)
    config = read_config(spec, spec.format("hf"), raw, str(folder / "config.json"), len(tensors))
    return Checkpoint(folder, "hf", spec, raw, config, tensors, read, _carried_files(folder), info)


def open_native(folder: Path) -> Checkpoint:
    raw = _load_json(folder / "config.json")
    spec = get_spec(raw.get("architecture", ""))
    if not isinstance(raw.get("config", {}), dict):
        raise CheckpointError(f"{folder / 'config.json'}: \"config\" must be a JSON object")
    tensors, read = _open_tensors(folder)   # native weights are never stored quantized
    config = read_config(spec, spec.format("native"), raw.get("config", {}), str(folder / "config.json"),
                         len(tensors))
    return Checkpoint(folder, "native", spec, raw, config, tensors, read, _carried_files(folder))


def _is_native(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    with open(cfg, "rb") as f:
        return NATIVE_MARKER.encode() in f.read(200)


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
