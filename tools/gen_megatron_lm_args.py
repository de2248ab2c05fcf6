"""Regenerate rosetool/converters/megatron/megatron_lm_args.json: every field Megatron-LM's `parse_args`
defines, with its default, for the megatron-core version rosetool targets.

Megatron-LM's training package is not on PyPI; this runs its `megatron/training/arguments.py` (and the
`argument_utils.py` it builds dataclass-driven groups with, and the three dataclass-only config modules
those read) from a Megatron-LM git checkout, beside the installed megatron-core of the same version, with
the logging/device helpers it imports from `megatron.training.utils` stubbed. Nothing else of Megatron-LM
is imported.

    python tools/gen_megatron_lm_args.py /path/to/Megatron-LM core_v0.16.1
"""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "rosetool/converters/megatron/megatron_lm_args.json"
_UTILS_STUB = '''
def get_device_arch_version(): return 9
def update_use_dist_ckpt(args): args.use_dist_ckpt = args.ckpt_format != "torch"
def print_rank_0(*a, **k): pass
def warn_rank_0(*a, **k): pass
def is_rank0(): return True
'''


def _value(v):
    """JSON for a default: enums by value (Megatron-LM compares args with the enum member, which rosetool
    rebuilds only as its value), anything else not JSON is refused loudly so the table stays data."""
    if isinstance(v, enum.Enum):
        return {"enum": f"{type(v).__module__}.{type(v).__qualname__}", "value": _value(v.value)}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"default {v!r} ({type(v).__name__}) has no JSON form")


def main(repo: str, tag: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "megatron" / "training"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "utils.py").write_text(_UTILS_STUB)
        for name in ("arguments.py", "argument_utils.py", "training_config.py", "resilience_config.py",
                     "common_config.py"):
            text = subprocess.run(["git", "-C", repo, "show", f"{tag}:megatron/training/{name}"],
                                  check=True, capture_output=True, text=True).stdout
            (pkg / name).write_text(text)
        sys.path.insert(0, tmp)
        sys.argv = ["pretrain_gpt.py"]
        from megatron.core import __version__ as core_version
        from megatron.training.arguments import parse_args
        args = parse_args(ignore_unknown_args=True)
    table = {k: _value(v) for k, v in sorted(vars(args).items())}
    OUT.write_text(json.dumps({"megatron_lm": tag, "megatron_core": core_version, "defaults": table},
                              indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(table)} fields from Megatron-LM {tag} (megatron-core {core_version})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
