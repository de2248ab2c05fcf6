"""What the CPU host gives the runtime: threads to compute with, memory for the KV pool.

Threads: torch's default is the machine's core count, which oversubscribes a process confined to
fewer cores (an affinity mask, a container's CPU quota, or colleagues' jobs on a shared box); an
oversubscribed intra-op pool turned one 8 us LayerNorm into 8 ms. The runtime uses the cores it may
actually run on, or `ROSETOOL_NUM_THREADS` when set.

Memory: the KV pool is mapped anonymously, so its pages are zero until written and only the blocks
sequences actually use count towards RSS; a pool sized for the worst case costs nothing until used.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

from rosetool.errors import RosetoolError


def _cgroup_cpus() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def cpu_threads() -> int:
    env = os.environ.get("ROSETOOL_NUM_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise RosetoolError(f"ROSETOOL_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def available_memory() -> int:
    """Bytes the kernel could hand out now without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages are only backed once written (anonymous mmap)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)
