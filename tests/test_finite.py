"""The NaN/Inf count: exact for every float dtype, checked against torch.isfinite."""

from __future__ import annotations

import pytest
import torch

from rosetool.converters.finite import count_nonfinite

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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_and_smallest_finite_values_are_finite(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([info.max, info.min, info.tiny, -info.tiny, 0.0, -0.0], dtype=torch.float64).to(dtype)
    assert count_nonfinite(x) == 0
    assert count_nonfinite(x[:0]) == 0
