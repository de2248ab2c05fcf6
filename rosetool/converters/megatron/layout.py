"""Where things are in a Megatron checkpoint folder: iteration folders, rank folders, PP stages."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    def rank_dir(self, tp_rank: int, pp_rank: int) -> str:
        return f"mp_rank_{tp_rank:02d}" if self.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"

    def stage_layers(self, num_layers: int) -> list[range]:
        """Even split, as Megatron does without uneven-pipeline flags."""
        if num_layers % self.pp:
            raise CheckpointError(f"{num_layers} layers cannot be split evenly over PP={self.pp}")
        n = num_layers // self.pp
        return [range(s * n, (s + 1) * n) for s in range(self.pp)]


SINGLE = Layout()


def iteration_dir(root: Path) -> tuple[Path, int | str]:
    """The folder the tracker file points at, or `root` itself when it is an iteration folder."""
    tracker = root / TRACKER
    if not tracker.exists():
        return root, _iteration_of(root.name)
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release", "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    folder = root / f"iter_{int(text):07d}"
    if not folder.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {int(text)}, but {folder.name}/ is missing")
    return folder, int(text)


def _iteration_of(name: str) -> int | str:
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else "release"


def is_torch_dist(folder: Path) -> bool:
    return (folder / ".metadata").exists()


def is_megatron(root: Path) -> bool:
    if (root / TRACKER).exists():
        return True
    return is_torch_dist(root) or any(_RANK_DIR.match(p.name) for p in root.glob("mp_rank_*"))


def rank_files(folder: Path, declared: Layout) -> dict[tuple[int, int], Path]:
    """(tp, pp) -> rank file, checked complete against the TP/PP the checkpoint declares."""
    found = {}
    for p in folder.iterdir():
        m = _RANK_DIR.match(p.name)
        if m and (p / RANK_FILE).exists():
            found[(int(m.group(1)), int(m.group(2) or 0))] = p / RANK_FILE
    for pp in range(declared.pp):
        for tp in range(declared.tp):
            if (tp, pp) not in found:
                raise CheckpointError(f"{folder / declared.rank_dir(tp, pp) / RANK_FILE}: missing rank file "
                                      f"(checkpoint declares TP={declared.tp}, PP={declared.pp})")
    extra = sorted(set(found) - {(t, p) for t in range(declared.tp) for p in range(declared.pp)})
    if extra:
        raise CheckpointError(f"{found[extra[0]]}: rank file outside the declared TP={declared.tp}, PP={declared.pp}")
    return found


def first_rank_file(folder: Path) -> Path:
    for name in ("mp_rank_00", "mp_rank_00_000"):
        if (folder / name / RANK_FILE).exists():
            return folder / name / RANK_FILE
    raise CheckpointError(f"{folder}: no {RANK_FILE} for TP rank 0 / PP stage 0 (mp_rank_00[_000]/)")
