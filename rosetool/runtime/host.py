"""What the CPU host gives the runtime: threads to compute with, memory for the KV pool.

Threads: torch's default is the machine's core count, which oversubscribes a process confined to
fewer cores (an affinity mask, a container's CPU quota) or sharing them with other jobs. Every
intra-op region ends at a barrier, so one descheduled thread stalls the rest: measured on a 2-core
box with a load average of 12, a [32, 768] x [768, 768] matmul took 40 ms on 2 threads and 0.45 ms
on 1, a LayerNorm 20 ms against 12 us. The runtime therefore takes the cores it may run on, less those
other work keeps busy (the 1-minute load average, before the runtime itself starts), at least one;
`ROSETOOL_NUM_THREADS` overrides the choice.

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
    usable = min(cores, math.ceil(quota)) if quota else cores
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, usable - busy)


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
