"""Where converted tensors go: safetensors files (sharded, streamed) or a dict in memory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import RosetoolError
from .safetensors_io import StreamWriter

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '1024' -> bytes (HF's --max-shard-size spelling)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise RosetoolError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class FolderSink:
    """Safetensors shards laid out from the plan; `model.safetensors.index.json` when more than one."""

    def __init__(self, folder: Path, outputs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | None = None, prefix: str = "model", metadata: dict[str, str] | None = None):
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in outputs:
            nbytes = math.prod(item[2]) * item[1].itemsize
            if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        names = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        meta = {"format": "pt", **(metadata or {})}
        self._writers = [StreamWriter(folder / name, shard, meta) for name, shard in zip(names, shards)]
        self._where = {key: w for w, shard in zip(self._writers, shards) for key, _, _ in shard}
        if n > 1:
            index = {"metadata": {"total_size": sum(math.prod(s) * d.itemsize for _, d, s in outputs)},
                     "weight_map": {key: w.path.name for key, w in self._where.items()}}
            (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._where[key].write(key, tensor)

    def copy(self, key: str, ranges: list[tuple[Path, int, int]]) -> None:
        self._where[key].copy(key, ranges)

    def write_rows(self, key: str, first: int, rows: torch.Tensor) -> None:
        self._where[key].write_rows(key, first, rows)

    def close(self, complete: bool = True) -> None:
        for w in self._writers:
            w.close(complete)


class DictSink:
    """Collects tensors in memory (loading a model straight from another format)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor.contiguous()
