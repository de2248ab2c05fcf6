"""Triton kernels for CUDA: K/V store by slot mapping and decode attention over block tables.

Triton is imported on first use, so the runtime imports and runs on CPU without it. The kernels also
run under `TRITON_INTERPRET=1` on CPU tensors, which is how the tests compare them to `attention.py`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_stride, v_stride,
                        ELEMS: tl.constexpr, BLOCK: tl.constexpr, HAS_V: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token)
        if slot >= 0:  # -1 marks padding rows (CUDA-graph batches)
            offs = tl.arange(0, BLOCK)
            mask = offs < ELEMS
            k = tl.load(k_ptr + token * k_stride + offs, mask=mask)
            tl.store(k_cache_ptr + slot * ELEMS + offs, k, mask=mask)
            if HAS_V:  # latent attention stores one latent; its V is a view of it
                v = tl.load(v_ptr + token * v_stride + offs, mask=mask)
                tl.store(v_cache_ptr + slot * ELEMS + offs, v, mask=mask)

    @triton.jit
    def decode_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                      scale, window, q_stride_b, q_stride_h, o_stride_b, o_stride_h, bt_stride,
                      c_stride_block, c_stride_tok, c_stride_head, block_size,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      V_DIM: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        ctx_len = tl.load(context_lens_ptr + seq)
        lo = tl.where(window > 0, tl.maximum(ctx_len - window, 0), 0)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_v = tl.arange(0, BLOCK_V)
        v_mask = offs_v < V_DIM
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + seq * q_stride_b + head * q_stride_h + offs_d, mask=d_mask, other=0.0)
        q = q.to(tl.float32)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for j in range(lo // block_size, tl.cdiv(ctx_len, block_size)):
            block = tl.load(block_tables_ptr + seq * bt_stride + j).to(tl.int64)
            pos = j * block_size + offs_n
            n_mask = (offs_n < block_size) & (pos < ctx_len) & (pos >= lo)
            base = block * c_stride_block + offs_n[:, None] * c_stride_tok + kv_head * c_stride_head
            tile_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + base + offs_d[None, :], mask=tile_mask, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
            s = tl.where(n_mask, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_cache_ptr + base + offs_v[None, :], mask=n_mask[:, None] & v_mask[None, :], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)  # empty (padding) rows give 0, not NaN
        tl.store(out_ptr + seq * o_stride_b + head * o_stride_h + offs_v,
                 out.to(out_ptr.dtype.element_ty), mask=v_mask)

    return store_kv_kernel, decode_kernel


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def store_kv(k: Tensor, v: Tensor | None, k_cache: Tensor, v_cache: Tensor | None, slot_mapping: Tensor) -> None:
    """Triton twin of `attention.store_kv`: `k`/`v` are [N, kv_heads, head_dim]; v None stores K only
    (latent attention, whose V cache is a view of its K cache)."""
    store_kernel, _ = _kernels()
    num_tokens = k.shape[0]
    k = k.reshape(num_tokens, -1).to(k_cache.dtype)
    if k.stride(1) != 1:
        k = k.contiguous()
    if v is not None:
        v = v.reshape(num_tokens, -1).to(v_cache.dtype)
        v = v if v.stride(1) == 1 else v.contiguous()
        assert v_cache.is_contiguous()
    elems = k.shape[1]
    assert k_cache.is_contiguous()
    store_kernel[(num_tokens,)](k, k if v is None else v, k_cache, k_cache if v is None else v_cache, slot_mapping,
                                k.stride(0), k.stride(0) if v is None else v.stride(0),
                                ELEMS=elems, BLOCK=_next_pow2(elems), HAS_V=v is not None)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float,
                           sliding_window: int | None = None) -> Tensor:
    """One query token per sequence (q: [B, heads, head_dim]) over its cached context. V may be narrower
    than K when it is a view of K's first dims (latent attention): out is [B, heads, v_dim]."""
    _, decode_kernel = _kernels()
    num_seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = q.new_empty(num_seqs, heads, v_dim)
    decode_kernel[(num_seqs, heads)](
        out, q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_size,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
        V_DIM=v_dim, BLOCK_V=_next_pow2(v_dim), BLOCK_N=_next_pow2(block_size))
    return out
