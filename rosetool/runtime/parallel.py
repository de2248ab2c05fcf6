"""Tensor-parallel processes: start them, join them over torch.distributed, and end them.

Rank 0 is the caller's process; ranks 1..N-1 are spawned here (torch.multiprocessing), or started by
`torchrun`, whose RANK/WORLD_SIZE/MASTER_ADDR are then read instead. Two groups join the ranks:
`compute` (NCCL on CUDA, gloo on CPU) carries the per-step collectives under a short timeout, so a
stuck or vanished rank fails a step instead of hanging it; `control` (gloo) carries only the notice
that a step (or the end) comes, which idle workers wait on for as long as the engine is idle, and
which rank 0 sends under the step timeout. A dead peer fails either at once (its sockets close). Spawned workers report start-up over a pipe, so a rank that fails to load is
named with its own error, and they exit when rank 0's process goes away, leaving no orphans.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rosetool.errors import RosetoolError

STEP_TIMEOUT = timedelta(seconds=float(os.environ.get("ROSETOOL_TP_TIMEOUT", "60")))
IDLE_TIMEOUT = timedelta(days=7)
START_TIMEOUT_S = float(os.environ.get("ROSETOOL_TP_START_TIMEOUT", "600"))


@dataclass
class TPGroup:
    rank: int
    world: int
    device: torch.device
    compute: Any = None     # dist.ProcessGroup
    control: Any = None
    workers: list[mp.Process] = field(default_factory=list)    # rank 0 of a spawned group only
    pipes: list[Connection] = field(default_factory=list)
    threads: int | None = None   # rank 0's own thread count, given back on close

    def failure(self, exc: BaseException) -> RosetoolError:
        """One line for a collective that failed: which rank is gone, if one is, else the cause."""
        time.sleep(0.2)   # a killed peer's exit code lands just after its sockets close
        for r, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                return RosetoolError(f"tensor-parallel rank {r} died mid-run ({_exit_reason(proc)})")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)   # gloo prefixes its source file and line
        return RosetoolError(f"tensor-parallel step failed on rank {self.rank}: {first} (a rank is hung or "
                             f"unreachable; ROSETOOL_TP_TIMEOUT={STEP_TIMEOUT.total_seconds():g} s)")

    def close(self, grace_s: float = 10.0) -> None:
        """Join the workers (terminating any still there after `grace_s`), then leave the process groups."""
        stop_processes(self.workers, grace_s)
        self.workers = []
        for pipe in self.pipes:
            pipe.close()
        self.pipes = []
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            self.threads = None
        if self.compute is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.compute = self.control = None


def _exit_reason(proc: mp.Process) -> str:
    code = proc.exitcode
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def share_cpu_threads(device: torch.device, world: int, threads: int) -> None:
    """CPU ranks on one machine split its cores (`threads` is the count one process would use) rather
    than oversubscribe them N times over."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads // world))


def require_no_group() -> None:
    if dist.is_initialized():
        raise RosetoolError("tensor parallelism needs its own torch.distributed group, and this process "
                            "already has one; close the other tensor-parallel LLM first")


def join_groups(group: TPGroup, init_method: str) -> None:
    backend = "nccl" if group.device.type == "cuda" else "gloo"
    if group.device.type == "cuda":
        torch.cuda.set_device(group.device)
    # Groups named by their ranks, not by this process's count of groups made so far: that count is
    # stale after a failed init (a port in use), and the fresh workers' count would not match it.
    ranks = list(range(group.world))
    dist.init_process_group(backend, init_method=init_method, rank=group.rank, world_size=group.world,
                            timeout=STEP_TIMEOUT, _ranks=ranks)
    group.compute = dist.group.WORLD
    group.control = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT, use_local_synchronization=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(world: int, device: torch.device, target: Callable[..., None],
                  args: tuple) -> tuple[TPGroup, str]:
    """Rank 0's group with ranks 1..world-1 started; returns it and the init address they share."""
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    group = TPGroup(0, world, rank_device(device, 0))
    ctx = mp.get_context("spawn")
    for rank in range(1, world):
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(rank, world, init_method, os.getpid(), theirs,
                                                torch.get_num_threads(), *args),
                           daemon=True, name=f"rosetool-tp-rank{rank}")
        proc.start()
        theirs.close()
        group.workers.append(proc)
        group.pipes.append(ours)
    return group, init_method


def await_workers(group: TPGroup, expected: str, what: str) -> None:
    """Wait until every worker reports `expected`; a worker's error or death ends the wait at once."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = dict(enumerate(zip(group.workers, group.pipes), start=1))
    while pending:
        for r, (proc, pipe) in list(pending.items()):
            message = _receive(pipe)
            if message == expected:
                del pending[r]
            elif message is not None:
                raise RosetoolError(f"tensor-parallel rank {r} failed while {what}: {message}")
            elif not proc.is_alive() or pipe.closed:
                proc.join(2.0)
                raise RosetoolError(f"tensor-parallel rank {r} failed while {what} ({_exit_reason(proc)})")
        if time.monotonic() > deadline:
            raise RosetoolError(f"tensor-parallel rank {min(pending)} did not finish {what} "
                                f"in {START_TIMEOUT_S:.0f} s")


def _receive(pipe: Connection) -> str | None:
    """The worker's next message, or None: none yet, or the pipe closed (the worker died)."""
    try:
        return pipe.recv_bytes().decode() if pipe.poll(0.05) else None
    except EOFError:
        pipe.close()
        return None


def stop_processes(procs: list[mp.Process], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def exit_with_parent(parent_pid: int) -> None:
    """A worker whose rank 0 vanished (killed, no goodbye) exits instead of lingering as an orphan."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="rosetool-tp-parent-watch").start()


def report(pipe: Connection | None, message: str) -> None:
    """Tell rank 0 how start-up goes (bytes, not pickles); torchrun ranks have no pipe."""
    if pipe is not None:
        pipe.send_bytes(message.encode())
