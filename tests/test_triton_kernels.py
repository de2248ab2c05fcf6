"""Triton kernels against the torch reference, run by the Triton CPU interpreter (tiny sizes: it is slow)."""

import math
import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # only read when triton is first imported
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import pytest
import torch

pytest.importorskip("triton")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in a subprocess instead")


@pytest.mark.skipif(INTERPRETED, reason="already interpreted in this process")
def test_kernels_in_interpreter_subprocess():
    """Triton was imported (compiled mode) before this module: rerun it where the interpreter is on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]

from rosetool.runtime import triton_kernels  # noqa: E402
from rosetool.runtime.attention import paged_attention, store_kv  # noqa: E402
from test_runtime_attention import build_paged  # noqa: E402


@needs_interpreter
@pytest.mark.parametrize("window", [None, 6])
def test_decode_kernel_matches_reference(window):
    seq_lens, heads, kv_heads, head_dim, block_size = [3, 17, 9], 4, 2, 8, 4
    k_cache, v_cache, ctx, _ = build_paged(seq_lens, [1, 1, 1], 16, block_size, kv_heads, head_dim)
    q = torch.randn(3, heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    expected = paged_attention(q, k_cache, v_cache, ctx, scale, window)
    out = triton_kernels.paged_decode_attention(
        q, k_cache, v_cache, ctx.block_tables.int(), ctx.context_lens.int(), scale, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_decode_kernel_padding_row_is_zero():
    k_cache = torch.randn(4, 4, 1, 8)
    q = torch.randn(2, 2, 8)
    tables = torch.tensor([[1, 3], [0, 0]], dtype=torch.int32)
    out = triton_kernels.paged_decode_attention(
        q, k_cache, k_cache.clone(), tables, torch.tensor([5, 0], dtype=torch.int32), 0.3)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@needs_interpreter
def test_store_kernel_matches_reference():
    k = torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 8)
    slots = torch.tensor([7, -1, 0, 12, 3])
    caches = [torch.zeros(4, 4, 2, 8) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    triton_kernels.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
