"""Where things are in a Megatron checkpoint folder: iteration folders, rank folders, PP stages,
expert-parallel ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...errors import CheckpointError
from ..paths import inside

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})((?:_\d{3}){0,2})$")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1    # expert parallel: each EP rank holds num_experts / ep experts, numbered from 0

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """Megatron-LM's get_checkpoint_name: `mp_rank_TT[_PPP][_EEE]`, each suffix only when that
        parallelism is > 1 (so `mp_rank_00_001` is a PP stage or an EP rank, as the args declare)."""
        name = f"mp_rank_{tp_rank:02d}" if self.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
        return name if self.ep == 1 else f"{name}_{ep_rank:03d}"

    def ranks(self) -> Iterator[tuple[int, int, int]]:
        """Lazily: a layout is args from a checkpoint, and TP=10^9 must not become a list."""
        return ((t, p, e) for p in range(self.pp) for e in range(self.ep) for t in range(self.tp))

    def holds(self, rank: tuple[int, int, int]) -> bool:
        t, p, e = rank
        return 0 <= t < self.tp and 0 <= p < self.pp and 0 <= e < self.ep

    def experts_per_rank(self, num_experts: int) -> int:
        if num_experts % self.ep:
            raise CheckpointError(f"{num_experts} experts cannot be split evenly over EP={self.ep}")
        return num_experts // self.ep

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
        return inside(root, "release", tracker), "release"
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    folder = root / f"iter_{int(text):07d}"
    if not folder.is_dir() and not folder.is_symlink():
        raise CheckpointError(f"{tracker}: names iteration {int(text)}, but {folder.name}/ is missing")
    return inside(root, folder.name, tracker), int(text)


def _iteration_of(name: str) -> int | str:
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else "release"


def is_torch_dist(folder: Path) -> bool:
    return (folder / ".metadata").exists()


def is_nemo2(root: Path) -> bool:
    """NeMo 2's layout: torch_dist tensors in `weights/`, the model config in `context/model.yaml`."""
    return is_torch_dist(root / "weights") and (root / "context" / "model.yaml").is_file()


def is_megatron(root: Path) -> bool:
    if (root / TRACKER).exists() or is_nemo2(root):
        return True
    return is_torch_dist(root) or any(_RANK_DIR.match(p.name) for p in root.glob("mp_rank_*"))


def _rank_of(name: str, declared: Layout) -> tuple[int, int, int] | None:
    m = _RANK_DIR.match(name)
    if not m:
        return None
    rest = [int(x) for x in m.group(2).split("_")[1:]]
    if len(rest) != (declared.pp > 1) + (declared.ep > 1):
        return (-1, -1, -1)    # a folder of another layout
    pp = rest.pop(0) if declared.pp > 1 else 0
    return int(m.group(1)), pp, rest[0] if rest else 0


def rank_files(folder: Path, declared: Layout) -> dict[tuple[int, int, int], Path]:
    """(tp, pp, ep) -> rank file, checked complete against the TP/PP/EP the checkpoint declares."""
    what = f"TP={declared.tp}, PP={declared.pp}, EP={declared.ep}"
    found = {}
    for p in sorted(folder.iterdir()):
        rank = _rank_of(p.name, declared)
        if rank is not None and ((p / RANK_FILE).exists() or (p / RANK_FILE).is_symlink()):
            if rank == (-1, -1, -1) or rank in found:
                raise CheckpointError(f"{p / RANK_FILE}: rank folder does not fit the declared {what}")
            found[rank] = inside(folder, f"{p.name}/{RANK_FILE}", p / RANK_FILE)   # as a shard symlinked out
    for rank in declared.ranks():
        if rank not in found:
            raise CheckpointError(f"{folder / declared.rank_dir(*rank) / RANK_FILE}: missing rank file "
                                  f"(checkpoint declares {what})")
    extra = sorted(r for r in found if not declared.holds(r))
    if extra:
        raise CheckpointError(f"{found[extra[0]]}: rank file outside the declared {what}")
    return found


def first_rank_file(folder: Path) -> Path:
    for name in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000"):
        if (folder / name / RANK_FILE).exists() or (folder / name / RANK_FILE).is_symlink():
            return inside(folder, f"{name}/{RANK_FILE}", folder / name / RANK_FILE)
    raise CheckpointError(f"{folder}: no {RANK_FILE} for TP rank 0 / PP stage 0 (mp_rank_00[_000]/)")
