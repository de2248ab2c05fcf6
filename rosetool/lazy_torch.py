"""`torch`, imported on first attribute access.

Reading YAML specs, safetensors headers and `--help` needs no tensors, and importing torch costs 1.5-4 s;
modules below the CLI that only touch torch inside functions import this instead of torch.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(self.__name__), name)


torch = _LazyModule("torch")
