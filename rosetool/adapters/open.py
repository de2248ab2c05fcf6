"""Open an adapter folder of either kind: HF PEFT (`adapter_config.json`) or Megatron (`rosetool_lora.json`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..converters.sources import Checkpoint
from .lora import Adapter
from .megatron_io import RECORD, is_megatron_adapter, read_megatron_adapter
from .peft_io import CONFIG, is_peft, read_peft


def open_adapter(path: str | Path, base: Checkpoint) -> Adapter:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    if is_peft(folder):
        return read_peft(folder)
    if is_megatron_adapter(folder):
        return read_megatron_adapter(folder, base)
    raise CheckpointError(f"{folder}: not a LoRA adapter (no {CONFIG} for HF PEFT, no {RECORD} for Megatron)")
