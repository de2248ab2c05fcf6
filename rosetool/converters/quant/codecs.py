"""The arithmetic of each published weight encoding, both ways, as plain tensor functions.

Decoding follows the published definition exactly, so it is bit-exact rather than close:
`bf16(fp32(q) * fp32(scale of q's block))` for FP8 and INT4 (what DeepSeek's kernel, transformers and
compressed-tensors compute), `ldexp(e2m1, exponent - 127)` for MXFP4. Edge blocks may be partial
(DeepSeek's 576-row kv_a_proj_with_mqa is 4.5 blocks of 128): a block grid is expanded and cropped,
never required to divide the weight.

Encoding (FP8 only) matches the reference quantizers bit for bit: transformers' FineGrainedFP8
(`scale = 448 / block amax`, stored inverse `1 / scale`, all-zero blocks get scale 1) and
compressed-tensors' per-channel FP8 (`scale = amax / 448`).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)   # 448
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Scale-grid shape for a [N, K] weight in blocks of [bn, bk]: partial edge blocks count."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_blocks(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """A [.., ceil(N/bn), ceil(K/bk)] grid -> one value per element of [.., N, K]."""
    n, k = shape[-2:]
    return scale.repeat_interleave(block[0], -2)[..., :n, :].repeat_interleave(block[1], -1)[..., :k]


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponents (float8_e8m0fnu or raw uint8 bytes, bias 127) -> the fp32 powers of two."""
    bits = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    return torch.ldexp(torch.ones(bits.shape, dtype=torch.float32), bits.to(torch.int32) - 127)


def scale_as_float(scale: torch.Tensor) -> torch.Tensor:
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    return e8m0_to_float(scale) if scale.dtype in (torch.uint8, e8m0) else scale.to(torch.float32)


_PAIRS: dict[torch.dtype, np.ndarray] = {}


def _pair_table(dtype: torch.dtype) -> np.ndarray:
    """fp32 values of every two consecutive FP8 codes, as one uint64 per uint16 of codes (512 KiB, so it
    stays in cache): one lookup yields two floats."""
    table = _PAIRS.get(dtype)
    if table is None:
        one = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy().view(np.uint32).astype(np.uint64)
        low_first = one[None, :] | one[:, None] << np.uint64(32)   # [hi, lo]: the first code is the low half
        table = _PAIRS[dtype] = low_first.reshape(-1) if sys.byteorder == "little" else \
            (one[:, None] | one[None, :] << np.uint64(32)).reshape(-1)
    return table


def codes_to_float(q: torch.Tensor) -> torch.Tensor:
    """Exact fp32 value of each code, as a fresh tensor (the caller scales it in place). FP8 on CPU goes
    through a table of code pairs, about twice the speed of torch's float8 cast on two threads; anything
    else is a plain cast."""
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or q.device.type != "cpu" or q.numel() % 2:
        return q.to(torch.float32, copy=True)
    pairs = q.contiguous().view(-1).view(torch.uint8).numpy().view(np.uint16)
    return torch.from_numpy(_pair_table(q.dtype)[pairs].view(np.float32)).view(q.shape)


def _scale_blocks(x: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> None:
    """x[N, K] *= the scale of each element's block, in place, by broadcasting over block views (no
    scale expanded to the weight's size). Partial edge blocks are the row and column tails."""
    n, k = x.shape
    bn, bk = block
    gn, gk = n // bn, k // bk                     # whole blocks each way
    nf, kf = gn * bn, gk * bk
    if gn:
        rows = x[:nf].unflatten(0, (gn, bn))      # [gn, bn, K]
        if gk:
            rows[..., :kf].unflatten(-1, (gk, bk)).mul_(s[:gn, None, :gk, None])
        if kf < k:
            rows[..., kf:].mul_(s[:gn, gk, None, None])
    if nf < n:
        tail = x[nf:]
        if gk:
            tail[:, :kf].unflatten(-1, (gk, bk)).mul_(s[gn, :gk, None])
        if kf < k:
            tail[:, kf:].mul_(s[gn, gk])


def dequant_scaled(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   out: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 or INT values times their scale: one scalar, per row ([N, 1]), per group or per block. The
    product is an fp32 multiply, as the published formula and DeepSeek's kernel form it, rounded to `out`
    once. Whole tensors at a time: banding rows through cache measured no faster (many small ops, each
    waking torch's thread pool)."""
    s = scale_as_float(scale)
    x = codes_to_float(q)
    if block is None:
        x.mul_(s)
    else:
        _scale_blocks(x, s, block)
    return x.to(out)


def dequant_groups(q: torch.Tensor, scale: torch.Tensor, group: int, out: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Integer values [N, K] with one scale per `group` consecutive inputs of a row ([N, ceil(K/group)])."""
    return dequant_scaled(q, scale, (1, group), out)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized: eight 4-bit values per int32 along the row, element i in
    bits 4i..4i+3 of the little-endian row, stored with an offset of 8 -> int8 values in [-8, 7]."""
    nibbles = packed.contiguous().view(torch.uint8)
    if not nibbles.is_contiguous() or torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] != 1:
        raise ValueError("int4 unpacking assumes a little-endian host")
    values = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :cols].to(torch.int8) - 8


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, out: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """OCP MX FP4 as GPT-OSS ships it: blocks uint8 [.., rows, G, 16] (two e2m1 values a byte, low nibble
    first; 32 values a group) and scales uint8 [.., rows, G] (E8M0, bias 127) -> [.., rows, G * 32]."""
    lut = torch.tensor(E2M1, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0xF).long()], lut[(blocks >> 4).long()]), dim=-1)
    values = values.reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    exps = scales.to(torch.int32) - 127
    return torch.ldexp(values, exps[..., None]).reshape(*blocks.shape[:-2], -1).to(out)


def _safe_ratio(amax: torch.Tensor) -> torch.Tensor:
    """`448 / amax`, with all-zero blocks given scale 1 (their codes are zeros whatever the scale)."""
    return torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))


def quant_fp8_block(w: torch.Tensor, block: tuple[int, int], ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (FP8 codes [N, K], `weight_scale_inv` fp32 [ceil(N/bn), ceil(K/bk)]); a partial edge
    block takes the amax of the elements it has. `ue8m0` rounds each stored inverse scale up to a power of
    two (DeepSeek-V3.1's `scale_fmt`), so no value exceeds 448 after scaling."""
    n, k = w.shape
    gn, gk = block_grid((n, k), block)
    w32 = w.to(torch.float32)
    padded = torch.zeros(gn * block[0], gk * block[1], dtype=torch.float32)
    padded[:n, :k] = w32.abs()
    amax = padded.reshape(gn, block[0], gk, block[1]).amax(dim=(1, 3))
    scale = _safe_ratio(amax)
    inv = (1.0 / scale).to(torch.float32)
    if ue8m0:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / inv
    q = torch.clamp(w32 * expand_blocks(scale, (n, k), block), -FP8_MAX, FP8_MAX).to(FP8)
    return q, inv


def quant_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (FP8 codes, per-output-channel scale [N, 1] in the weight's dtype), as compressed-tensors'
    FP8 channel strategy computes it: scale = amax / 448 (a zero row gets the dtype's eps)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = (amax.to(torch.float32) / FP8_MAX).to(w.dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(w.dtype).eps))
    q = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(FP8)   # divided in the weight's dtype, as the reference does
    return q, scale
