"""Outputs appear whole or not at all, and never at the cost of a user's files.

A run writes into a hidden temporary folder beside the destination, holding a lock on the
destination so two runs cannot race for it, and renames the folder into place when complete. The
destination is checked again at that moment: whatever appeared or changed there meanwhile is kept
(with `--force` too: it replaces the destination as it was when the run started) and the finished
output is left beside it under a visible name. A destination that is a symlink is never followed:
`--force` replaces the link itself. Failures, Ctrl-C and SIGTERM remove
the temporary folder; what SIGKILL leaves behind is removed by the next run to the same destination.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
import signal
import stat
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import RosetoolError, RosetoolWarning
from .paths import resolved

_LEFTOVER = re.compile(r"\.rosetool-(?:tmp|old)-(\d+)$")


def check_destination(dst: Path, force: bool, src: Path | None = None) -> None:
    if src is not None:   # a symlink DST is replaced, never followed: where it is, not where it leads
        real = resolved(dst.parent) / dst.name if dst.is_symlink() else resolved(dst)
        src = resolved(src)
        if real == src or src in real.parents or real in src.parents:
            raise RosetoolError(f"{dst}: destination overlaps the source {src}; rosetool never writes into a source")
    if dst.is_symlink():
        if not force:
            raise RosetoolError(f"{dst}: destination is a symlink (pass --force to replace the link itself; "
                                f"what it points to is never touched)")
        return
    if dst.exists() and not dst.is_dir():
        raise RosetoolError(f"{dst}: destination exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise RosetoolError(f"{dst}: destination is not empty (pass --force to replace it)")


@contextmanager
def _lock(dst: Path) -> Iterator[None]:
    """An exclusive lock beside `dst`, removed on release; a lock file replaced while we waited is retried."""
    path = dst.parent / f".{dst.name}.rosetool-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RosetoolError(f"{dst}: another rosetool run is writing this destination") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # the previous holder removed the file between our open and our lock
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: Path) -> list[Path]:
    """Temporary folders of earlier runs to `dst` whose process is gone (SIGKILL, power loss), or
    carry our own pid (reused). Called with the lock held, so no live rosetool run can be writing them."""
    removed = []
    for p in dst.parent.glob(f".{glob.escape(dst.name)}.rosetool-*-*"):
        m = _LEFTOVER.search(p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and (pid == os.getpid() or not _alive(pid)) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class _Terminated(SystemExit):
    """SIGTERM, turned into an exception so the temporary folder is removed on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(128 + signal.SIGTERM)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def snapshot(dst: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """Every entry at and under `dst` (links not followed): path, mode, inode, size, mtime. `--force`
    replaces what was there when the run started; a different snapshot at the end means someone wrote
    there meanwhile, and that is kept."""
    try:
        top = os.lstat(dst)
    except FileNotFoundError:
        return ()
    entries = [("", top.st_mode, top.st_ino, top.st_size, top.st_mtime_ns)]
    if stat.S_ISDIR(top.st_mode):
        for root, dirs, files in os.walk(dst):
            for name in dirs + files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                entries.append((os.path.relpath(path, dst), st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _commit(tmp: Path, dst: Path, force: bool, before: tuple = ()) -> None:
    """Move the finished folder into place, re-checking `dst` now rather than trusting the start:
    `--force` replaces `dst` only as it was then (`before`, its snapshot)."""
    if force and snapshot(dst) != before:
        _keep(tmp, dst)
    if force and dst.is_symlink():
        dst.unlink()           # the link goes, never what it points to
    elif force and dst.is_dir() and any(dst.iterdir()):
        old = dst.parent / f".{dst.name}.rosetool-old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, dst)    # onto nothing or an empty folder only; never onto a file, link or contents
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        _keep(tmp, dst)


def _keep(tmp: Path, dst: Path) -> None:
    kept = dst.parent / f"{dst.name}.rosetool-finished-{os.getpid()}"
    tmp.rename(kept)
    raise RosetoolError(f"{dst}: destination changed during the run and was left as it is; "
                        f"the finished output is at {kept}") from None


@contextmanager
def atomic_output(dst: Path, force: bool = False, src: Path | None = None) -> Iterator[Path]:
    dst = Path(os.path.abspath(dst))   # abspath, not resolve: a symlink at `dst` must stay a symlink
    check_destination(dst, force, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dst), _sigterm_unwinds():
        for p in remove_stale(dst):
            warnings.warn(f"removed {p}, left by an earlier run that was killed", RosetoolWarning, stacklevel=3)
        check_destination(dst, force, src)   # again: another run may have finished before we took the lock
        before = snapshot(dst) if force else ()
        tmp = dst.parent / f".{dst.name}.rosetool-tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            _commit(tmp, dst, force, before)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
