"""Outputs appear whole or not at all: write into a hidden temporary folder beside the destination,
rename it into place when complete, and remove it on any failure or interruption."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import RosetoolError


def check_destination(dst: Path, force: bool, src: Path | None = None) -> None:
    dst = dst.resolve()
    if src is not None:
        src = src.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise RosetoolError(f"{dst}: destination overlaps the source {src}; rosetool never writes into a source")
    if dst.exists() and not dst.is_dir():
        raise RosetoolError(f"{dst}: destination exists and is a file")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise RosetoolError(f"{dst}: destination is not empty (pass --force to replace it)")


@contextmanager
def atomic_output(dst: Path, force: bool = False, src: Path | None = None) -> Iterator[Path]:
    check_destination(dst, force, src)
    dst = dst.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.rosetool-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dst.parent / f".{dst.name}.rosetool-old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
