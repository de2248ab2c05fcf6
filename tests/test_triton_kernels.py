"""Triton kernels against the torch reference: on CUDA for real, otherwise through Triton's CPU
interpreter (conftest turns it on before anything imports triton). Tiny sizes: interpreting is slow."""

import math

import pytest
import torch

from rosetool.runtime import triton_kernels
from rosetool.runtime.attention import paged_attention, store_kv
from test_runtime_attention import build_paged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_is_installed_for_these_checks():
    assert triton_kernels.triton_available(), "install the test extras: the kernels must not go unchecked"


@pytest.mark.parametrize("window", [None, 6])
def test_decode_kernel_matches_reference(window):
    seq_lens, heads, kv_heads, head_dim, block_size = [3, 17, 9], 4, 2, 8, 4
    k_cache, v_cache, ctx, _ = build_paged(seq_lens, [1, 1, 1], 16, block_size, kv_heads, head_dim)
    q = torch.randn(3, heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    expected = paged_attention(q, k_cache, v_cache, ctx, scale, window)
    out = triton_kernels.paged_decode_attention(
        *(t.to(DEVICE) for t in (q, k_cache, v_cache, ctx.block_tables.int(), ctx.context_lens.int())), scale, window)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_decode_kernel_padding_row_is_zero():
    k_cache = torch.randn(4, 4, 1, 8, device=DEVICE)
    q = torch.randn(2, 2, 8, device=DEVICE)
    tables = torch.tensor([[1, 3], [0, 0]], dtype=torch.int32, device=DEVICE)
    out = triton_kernels.paged_decode_attention(
        q, k_cache, k_cache.clone(), tables, torch.tensor([5, 0], dtype=torch.int32, device=DEVICE), 0.3)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_store_kernel_matches_reference():
    k = torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 8)
    slots = torch.tensor([7, -1, 0, 12, 3])
    ref_k, ref_v = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    store_kv(k, v, ref_k, ref_v, slots)
    got_k, got_v = torch.zeros(4, 4, 2, 8, device=DEVICE), torch.zeros(4, 4, 2, 8, device=DEVICE)
    triton_kernels.store_kv(k.to(DEVICE), v.to(DEVICE), got_k, got_v, slots.to(DEVICE))
    assert torch.equal(ref_k, got_k.cpu()) and torch.equal(ref_v, got_v.cpu())


@pytest.mark.parametrize("window", [None, 5])
def test_decode_kernel_latent_attention_matches_reference(window):
    """DeepSeek's latent attention: one K/V "head" of latent + rotary dims shared by all heads, V the first
    `rank` dims of the same cache (a view, same strides), so the output is narrower than the query."""
    seq_lens, heads, rank, rope, block_size = [3, 17, 9], 5, 12, 4, 4
    k_cache, _, ctx, _ = build_paged(seq_lens, [1, 1, 1], 16, block_size, 1, rank + rope)
    v_cache = k_cache[..., :rank]
    q = torch.randn(3, heads, rank + rope)
    expected = paged_attention(q, k_cache, v_cache, ctx, 0.3, window)
    out = triton_kernels.paged_decode_attention(
        *(t.to(DEVICE) for t in (q, k_cache)), k_cache.to(DEVICE)[..., :rank],
        *(t.to(DEVICE) for t in (ctx.block_tables.int(), ctx.context_lens.int())), 0.3, window)
    assert out.shape == (3, heads, rank)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_store_kernel_stores_k_alone_for_latent_attention():
    latent = torch.randn(5, 1, 16)
    slots = torch.tensor([7, -1, 0, 12, 3])
    ref, got = torch.zeros(4, 4, 1, 16), torch.zeros(4, 4, 1, 16, device=DEVICE)
    store_kv(latent, latent[..., :12], ref, ref[..., :12], slots)
    triton_kernels.store_kv(latent.to(DEVICE), None, got, None, slots.to(DEVICE))
    assert torch.equal(ref, got.cpu())


def test_latent_paged_attention_decode_step_is_the_same_through_triton():
    """The whole `PagedAttention` step the runner takes on CUDA (store the latent, decode over it) against its
    torch path: same cache afterwards, same output."""
    from rosetool.runtime.attention import PagedAttention
    k_cache, _, ctx, _ = build_paged([3, 17, 9], [1, 1, 1], 16, 4, 1, 16)
    gen = torch.Generator().manual_seed(1)
    q, latent = torch.randn(1, 3, 5, 16, generator=gen), torch.randn(1, 3, 1, 16, generator=gen)
    outs, caches = [], []
    for use_triton in (False, True):
        cache = k_cache.clone().to(DEVICE)
        attn = PagedAttention(cache[None], cache[None][..., :12], 0.3, [None], use_triton, latent=True)
        attn.context = ctx if DEVICE == "cpu" else _to(ctx, DEVICE)
        outs.append(attn(0, q.to(DEVICE), latent.to(DEVICE), latent.to(DEVICE)[..., :12]).cpu())
        caches.append(cache.cpu())
    assert torch.equal(caches[0], caches[1])
    assert outs[1].shape == (1, 3, 5, 12)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _to(ctx, device):
    from dataclasses import fields, replace
    return replace(ctx, **{f.name: getattr(ctx, f.name).to(device) for f in fields(ctx)
                           if isinstance(getattr(ctx, f.name), torch.Tensor)})
