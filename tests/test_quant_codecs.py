"""The codecs against the reference implementations nobody here wrote: transformers' FineGrainedFP8 and
MXFP4 integrations, compressed-tensors' packer and quantizer; and against the published formula itself,
element by element, where the references refuse (partial edge blocks)."""

from __future__ import annotations

import pytest
import torch

from quant_models import dequant_block, fp8_block
from rosetool.converters.quant import codecs


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, k)   # columns of very different magnitude
    w[0] = 0.0                                                       # an all-zero row: a zero block
    return w.to(torch.bfloat16)


class _Cfg:
    def __init__(self, block, scale_fmt=None):
        self.weight_block_size, self.scale_fmt = block, scale_fmt


class _Quantizer:
    def __init__(self, block, scale_fmt=None):
        self.quantization_config = _Cfg(block, scale_fmt)


@pytest.mark.parametrize("shape,block", [((576, 200), (128, 128)), ((72, 40), (16, 24)), ((5, 7), (4, 4))])
def test_fp8_block_dequant_is_the_formula_with_partial_edge_blocks(shape, block):
    q, inv = fp8_block(_weights(*shape), block)
    got = codecs.dequant_scaled(q, inv, block)
    assert torch.equal(got.view(torch.int16), dequant_block(q, inv, block).view(torch.int16))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_block_matches_transformers_both_ways_on_whole_blocks(scale_fmt):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
    w = _weights(256, 384)
    ref = Fp8Quantize(_Quantizer([128, 128], scale_fmt))._quantize_one("x.weight", w)
    q, inv = codecs.quant_fp8_block(w, (128, 128), ue8m0=scale_fmt == "ue8m0")
    assert torch.equal(q.view(torch.uint8), ref["x.weight"].view(torch.uint8))
    assert torch.equal(inv.float(), ref["x.weight_scale_inv"].float())
    deq = Fp8Dequantize(None)._dequantize_one(q, inv, output_dtype=torch.bfloat16)
    assert torch.equal(codecs.dequant_scaled(q, inv, (128, 128)).view(torch.int16), deq.view(torch.int16))


def test_fp8_block_partial_blocks_quantize_each_block_by_its_own_amax():
    w = _weights(200, 136)
    q, inv = codecs.quant_fp8_block(w, (128, 128))
    assert inv.shape == (2, 2)
    for i, j in [(0, 0), (1, 1), (1, 0)]:
        blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
        assert inv[i, j] == 1.0 / (448.0 / blk.abs().max())
    err = (codecs.dequant_scaled(q, inv, (128, 128)).float() - w.float()).abs().max()
    assert err <= w.float().abs().max() / 16   # e4m3 keeps 3 mantissa bits: at most half a step of 1/8


def test_ue8m0_scales_stored_as_e8m0_decode_to_powers_of_two():
    q, inv = fp8_block(_weights(64, 64), (32, 32), ue8m0=True)
    as_e8m0 = inv.to(torch.float8_e8m0fnu)
    assert torch.equal(codecs.scale_as_float(as_e8m0), inv)
    assert torch.equal(codecs.dequant_scaled(q, as_e8m0, (32, 32)), codecs.dequant_scaled(q, inv, (32, 32)))


def test_fp8_channel_matches_compressed_tensors_quantizer():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    w = _weights(96, 80)
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    scale, zp = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    ref = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    q, s = codecs.quant_fp8_channel(w)
    assert torch.equal(s, scale)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    ref_deq = dequantize(ref, scale, zp, args, dtype=torch.bfloat16)
    assert torch.equal(codecs.dequant_scaled(q, s, None).view(torch.int16), ref_deq.view(torch.int16))


def test_int4_unpack_and_dequant_match_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (24, 100), generator=g, dtype=torch.int8)   # 100 inputs: a partial last word
    packed = pack_to_int32(codes, 4)
    assert torch.equal(codecs.unpack_int4(packed, 100), unpack_from_int32(packed, 4, torch.Size([24, 100])))
    scale = (torch.rand(24, 5, generator=g) / 7).to(torch.bfloat16)          # groups of 20
    want = (codes.float() * scale.float().repeat_interleave(20, 1)).to(torch.bfloat16)
    assert torch.equal(codecs.dequant_groups(codecs.unpack_int4(packed, 100), scale, 20), want)


def test_mxfp4_matches_transformers_gpt_oss_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)   # [E, out, in/32, 16]
    scales = torch.randint(110, 135, (3, 40, 4), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales)          # [E, in, out]: transposed for GPT-OSS's forward
    got = codecs.dequant_mxfp4(blocks, scales)
    assert got.shape == (3, 40, 128)
    assert torch.equal(got.transpose(1, 2).contiguous().view(torch.int16), ref.view(torch.int16))
