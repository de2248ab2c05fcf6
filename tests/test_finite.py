"""The NaN/Inf count: exact for every float dtype, checked against torch.isfinite; and the scan that runs
beside a conversion reports when the conversion's body ends, or gives way to the body's own error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rosetool.converters.finite import _chunk_nonfinite, count_nonfinite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", [(), (0,), (3, 998), (1, 2, 500)])
def test_counts_every_nan_and_inf(dtype, positions):
    torch.manual_seed(len(positions))
    x = torch.randn(999).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf")]
    for i, p in enumerate(positions):   # float8_e4m3fn has no Inf: it stores NaN there
        x[p] = specials[i % 3] if dtype != torch.float8_e4m3fn else float("nan")
    assert count_nonfinite(x) == len(positions) == int((~torch.isfinite(x.float())).sum())
    assert raw_count(x) == len(positions)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_and_smallest_finite_values_are_finite(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([info.max, info.min, info.tiny, -info.tiny, 0.0, -0.0], dtype=torch.float64).to(dtype)
    assert count_nonfinite(x) == 0 == raw_count(x)
    assert count_nonfinite(x[:0]) == 0 == raw_count(x[:0])


def raw_count(x: torch.Tensor) -> int:
    """The count the file scan makes from a chunk's raw bytes."""
    chunk = x.reshape(-1).view(torch.uint8).numpy()
    return _chunk_nonfinite(chunk, x.dtype, np.empty(chunk.nbytes, np.uint8))


def _nan_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from rosetool.converters.sources import open_checkpoint
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.h.1.mlp.c_fc.weight"][2, 3] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    return open_checkpoint(tmp_path)


def test_scan_alongside_reports_when_the_body_ends(tmp_path):
    """The scan runs beside the body; its findings come after the body, as a warning or a --strict error."""
    from rosetool.converters.finite import scan_alongside
    from rosetool.errors import CheckpointError, RosetoolWarning
    ckpt = _nan_checkpoint(tmp_path)
    body_ran = []
    with pytest.warns(RosetoolWarning, match=r"transformer\.h\.1\.mlp\.c_fc\.weight' has 1 NaN/Inf"):
        with scan_alongside(ckpt, ckpt.tensors):
            body_ran.append(True)
    assert body_ran
    with pytest.raises(CheckpointError, match=r"c_fc\.weight' has 1 NaN/Inf value\(s\) \(--strict\)"):
        with scan_alongside(ckpt, ckpt.tensors, strict=True):
            body_ran.append(True)
    assert len(body_ran) == 2       # the body ran; the refusal comes before the caller commits its output


def test_a_failing_body_wins_over_the_scan(tmp_path):
    from rosetool.converters.finite import scan_alongside
    ckpt = _nan_checkpoint(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        with scan_alongside(ckpt, ckpt.tensors, strict=True):
            raise OSError("disk full")
