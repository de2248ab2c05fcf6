"""Where a path really leads, and the one rule for files a checkpoint names: they stay inside it.

Every format's files (safetensors shards, tokenizer files, Megatron rank files, torch_dist data files)
are checked with `inside`: a `../`, an absolute path or a symlink that leads out of the checkpoint folder
is refused. The one exception is a huggingface_hub snapshot, whose files are symlinks into the cache's
`blobs/` folder beside `snapshots/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, RosetoolError


def resolved(path: Path) -> Path:
    """`path.resolve()`, with a symlink loop (`ln -s loop loop`) a one-line error, not a RuntimeError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:   # Python < 3.13 raises RuntimeError on a loop
        raise RosetoolError(f"{path}: cannot resolve the path ({' '.join(str(exc).split())[:120]})") from None


def roots(folder: Path) -> tuple[Path, ...]:
    """Where a source's files may live: the folder, and for a huggingface_hub snapshot its `blobs`,
    which the snapshot's symlinks point into."""
    root = resolved(folder)
    return (root, root.parent.parent / "blobs") if root.parent.name == "snapshots" else (root,)


def inside(folder: Path, name: str, listed_in: Path) -> Path:
    """`folder / name`, refused when a `../`, an absolute path or a symlink would lead out of `folder`."""
    if not name or os.path.isabs(name) \
            or not any(root in resolved(folder / name).parents for root in roots(folder)):
        raise CheckpointError(f"{listed_in}: {name!r} leads outside the checkpoint folder {folder}; refused")
    return folder / name
