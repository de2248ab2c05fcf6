"""Backends a benchmark can drive; each is imported only when chosen, so `hf` never loads the runtime."""

from __future__ import annotations

from rosetool.bench.backends.base import BACKENDS, Backend, BackendConfig, Schedule
from rosetool.errors import RosetoolError

__all__ = ["BACKENDS", "Backend", "BackendConfig", "Schedule", "make_backend"]


def make_backend(cfg: BackendConfig) -> Backend:
    if cfg.name == "rosetool":
        from rosetool.bench.backends.rosetool_engine import RosetoolBackend

        return RosetoolBackend(cfg)
    if cfg.name == "hf":
        from rosetool.bench.backends.hf import HFBackend

        return HFBackend(cfg)
    if cfg.name == "openai":
        from rosetool.bench.backends.openai import OpenAIBackend

        return OpenAIBackend(cfg)
    if cfg.name == "rosetool-server":
        from rosetool.bench.backends.rosetool_server import RosetoolServerBackend

        return RosetoolServerBackend(cfg)
    raise RosetoolError(f"--backend {cfg.name!r}: choose one of {', '.join(BACKENDS)}")
