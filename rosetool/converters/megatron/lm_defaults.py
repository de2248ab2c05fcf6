"""Megatron-LM's `parse_args` defaults, for the megatron-core version rosetool targets.

`megatron_lm_args.json` is generated from Megatron-LM's own argument parser by
`tools/gen_megatron_lm_args.py` (data, not a hand-kept list). Every args namespace rosetool writes starts
from it, so Megatron-LM resuming with `--use-checkpoint-args` and Megatron-Bridge's fallback to a
checkpoint's args find every field they read. The two fields whose default is an enum member
(`attention_backend`, `exit_signal`) are left out: writing the member would need megatron-core's class at
write time, and both readers take the same default when the field is absent.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("megatron_lm_args.json")


@functools.cache
def _table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def megatron_lm_defaults() -> dict[str, Any]:
    """A fresh copy (lists in it are mutable) of every default, enum-valued ones left out."""
    return {k: copy.copy(v) for k, v in _table()["defaults"].items() if not isinstance(v, dict)}


def targets() -> tuple[str, str]:
    """(Megatron-LM tag, megatron-core version) the table was generated from."""
    return _table()["megatron_lm"], _table()["megatron_core"]
