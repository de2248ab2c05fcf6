"""The streamed rank-file writer against torch.save: same tensors back through torch.load (weights_only,
mmap), valid zip CRCs, storages shared where torch.save shares them, and refusals when a write does not
match its plan."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
import torch

from rosetool.converters.megatron.torch_zip import PlannedTensor, TorchZipWriter
from rosetool.errors import RosetoolError

TENSORS = {
    "f32": torch.randn(7, 3),
    "bf16": torch.randn(5, 11).to(torch.bfloat16),
    "f16": torch.randn(13).half(),
    "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    "i64": torch.arange(9),
    "i8": torch.arange(-4, 4, dtype=torch.int8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 4),
    "odd": torch.randn(1, 1, 65),          # a record length no multiple of the alignment
}


def write(path: Path, order: list[str]) -> dict[str, PlannedTensor]:
    plan = {k: PlannedTensor(v.dtype, tuple(v.shape)) for k, v in TENSORS.items()}
    obj = {"args": argparse.Namespace(num_layers=2), "checkpoint_version": 3.0,
           "model": {"layers": {**plan, "tied": plan["bf16"], "extra._extra_state": None}}}
    writer = TorchZipWriter(path, obj)
    for key in order:
        writer.write(plan[key], TENSORS[key])
    writer.close()
    return plan


@pytest.mark.parametrize("mmap", [False, True])
def test_loads_like_torch_save(tmp_path: Path, mmap: bool) -> None:
    write(tmp_path / "model_optim_rng.pt", sorted(TENSORS, reverse=True))    # any write order
    torch.save({"model": {"layers": dict(TENSORS)}}, tmp_path / "ref.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        got = torch.load(tmp_path / "model_optim_rng.pt", weights_only=True, mmap=mmap)
    ref = torch.load(tmp_path / "ref.pt", weights_only=True, mmap=mmap)["model"]["layers"]
    layers = got["model"]["layers"]
    for key, want in ref.items():
        assert layers[key].dtype == want.dtype and layers[key].shape == want.shape, key
        assert layers[key].reshape(-1).view(torch.uint8).equal(want.reshape(-1).view(torch.uint8)), key
        assert layers[key].stride() == want.stride() and layers[key].storage_offset() == 0, key
    assert layers["tied"].untyped_storage().data_ptr() == layers["bf16"].untyped_storage().data_ptr()
    assert layers["extra._extra_state"] is None and got["args"].num_layers == 2 and got["checkpoint_version"] == 3.0


def test_records_match_torch_save_layout(tmp_path: Path) -> None:
    write(tmp_path / "model_optim_rng.pt", list(TENSORS))
    torch.save(dict(TENSORS), tmp_path / "ref.pt")
    with zipfile.ZipFile(tmp_path / "model_optim_rng.pt") as ours, zipfile.ZipFile(tmp_path / "ref.pt") as ref:
        assert ours.testzip() is None                       # every record's CRC is right
        names = [n.split("/", 1)[1] for n in ours.namelist()]
        assert {n for n in names if not n.startswith("data/")} == \
               {n.split("/", 1)[1] for n in ref.namelist() if "/data/" not in n}
        assert all(i.compress_type == zipfile.ZIP_STORED for i in ours.infolist())
        for info in ours.infolist():                        # data starts 64-byte aligned, as torch's mmap wants
            if "/data/" in info.filename:
                start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                assert start % 64 == 0, info.filename


def test_a_write_that_does_not_match_its_plan_is_refused(tmp_path: Path) -> None:
    plan = PlannedTensor(torch.float32, (2, 3))
    writer = TorchZipWriter(tmp_path / "x.pt", {"w": plan})
    with pytest.raises(RosetoolError, match=r"planned torch.float32 \[2, 3\].*got torch.float16"):
        writer.write(plan, torch.zeros(2, 3, dtype=torch.float16))
    writer = TorchZipWriter(tmp_path / "y.pt", {"w": plan})
    writer.write(plan, torch.zeros(2, 3))
    with pytest.raises(RosetoolError, match="written twice"):
        writer.write(plan, torch.zeros(2, 3))
    other = TorchZipWriter(tmp_path / "z.pt", {"w": PlannedTensor(torch.float32, (1,))})
    with pytest.raises(RosetoolError, match="1 tensor\\(s\\) never written"):
        other.close()
