"""Tensor-parallel slices read through the plan: they put back together into the whole model, KV heads
are replicated when fewer than ranks, bad sizes are refused, and a rank's load peaks at about 1/N."""

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import build_hf
from rosetool.canonical import ModelArgs
from rosetool.converters.api import convert, load_state
from rosetool.converters.sources import open_checkpoint
from rosetool.errors import RosetoolError
from rosetool.runtime.tp_shard import local_args, shard_state

MB = 1 << 20


def check_shards(folder, world):
    ckpt = open_checkpoint(folder)
    _, whole = load_state(ckpt, "native")
    args = ModelArgs.from_dict(ckpt.config)
    shards = [shard_state(ckpt, r, world) for r in range(world)]
    hd, kv = args.head_dim, args.num_kv_heads
    for key, full in whole.items():
        parts = [s[key] for s in shards]
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            q_rows, kv_rows = args.num_heads * hd // world, max(kv // world, 1) * hd
            split = [p.split([q_rows, kv_rows, kv_rows]) for p in parts]
            q, k, v = full.split([args.num_heads * hd, kv * hd, kv * hd])
            assert torch.equal(torch.cat([s[0] for s in split]), q), key
            for r, (_, k_r, v_r) in enumerate(split):   # rank r's KV heads: its own, or the one it shares
                first = r * kv // world
                assert torch.equal(k_r, k[first * hd: first * hd + kv_rows]), (key, r)
                assert torch.equal(v_r, v[first * hd: first * hd + kv_rows]), (key, r)
        elif key.endswith("mlp.up.weight") and args.glu:
            gate, up = full.chunk(2)
            assert torch.equal(torch.cat([p.chunk(2)[0] for p in parts]), gate), key
            assert torch.equal(torch.cat([p.chunk(2)[1] for p in parts]), up), key
        elif key.endswith(("attn.o.weight", "mlp.down.weight")):
            assert torch.equal(torch.cat(parts, dim=1), full), key
        elif key in ("embed.weight", "lm_head.weight") or key.endswith("mlp.up.weight") or \
                key.endswith("mlp.up.bias"):
            assert torch.equal(torch.cat(parts), full), key
        else:   # norms, row-parallel biases, positions: every rank holds the whole tensor
            assert all(torch.equal(p, full) for p in parts), key
    return shards


@pytest.mark.parametrize("kind,overrides", [
    ("gpt2", {}),
    ("llama", {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"num_key_value_heads": 1}),
    ("qwen3", {"head_dim": 24}),
], ids=["gpt2", "llama-gqa", "llama-kv1", "qwen3"])
def test_slices_reassemble_the_whole_model(tmp_path, kind, overrides):
    hf = build_hf(kind, tmp_path / "hf", **overrides)
    convert(hf, tmp_path / "native", "native")
    for folder in (hf, tmp_path / "native"):   # gpt2's HF tensors are transposed: read whole, then cut
        check_shards(folder, 2)
    check_shards(hf, 4)   # 4 ranks: KV heads (2 or 1) replicated


def test_sizes_that_do_not_divide_are_refused():
    args = ModelArgs(vocab_size=96, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=3, head_dim=8,
                     intermediate_size=90, max_position_embeddings=32)
    assert local_args(args, 3).num_kv_heads == 1 and local_args(args, 6).num_kv_heads == 1
    with pytest.raises(RosetoolError, match="num_kv_heads=3 can be neither split nor replicated"):
        local_args(args, 2)
    with pytest.raises(RosetoolError, match="does not divide num_heads=6"):
        local_args(args, 4)
    odd_vocab = ModelArgs(**{**args.__dict__, "vocab_size": 97})
    with pytest.raises(RosetoolError, match="does not divide vocab_size=97"):
        local_args(odd_vocab, 3)


LOAD = textwrap.dedent("""
    import sys
    from rosetool.runtime.loader import load_model
    from rosetool.runtime.tp_shard import TPShard
    def status(field):
        return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
    path, warm, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ep = int(sys.argv[4]) if len(sys.argv) > 4 else 1   # expert-parallel ranks (tests/test_moe_parallel.py)
    shard = TPShard(0, world, None, ep) if max(world, ep) > 1 else None
    load_model(warm, shard=shard)   # imports and allocator set-up, so they are not counted below
    open('/proc/self/clear_refs', 'w').write('5')   # reset VmHWM to the current RSS
    before = status('VmRSS')
    model, _ = load_model(path, shard=shard)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(before, status('VmHWM'), weights)
""")

def test_a_rank_peaks_at_about_half_the_model(tmp_path):
    # ~88 MB of fp32 weights, the largest tensor 8 MB: the rank's share dominates the peak.
    hf = build_hf("llama", tmp_path / "hf", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
    warm = build_hf("llama", tmp_path / "warm")

    def peak(world):
        out = subprocess.run([sys.executable, "-c", LOAD, str(hf), str(warm), str(world)], check=True, capture_output=True,
                             text=True).stdout.split()
        before, high, weights = map(int, out)
        return high - before, weights

    (whole_peak, whole), (rank_peak, rank) = peak(1), peak(2)
    assert whole > 80 * MB and abs(rank - whole / 2) < 0.01 * whole   # norms are replicated
    print(f"peak RSS growth: whole {whole_peak / MB:.0f} MB, rank 0 of 2 {rank_peak / MB:.0f} MB")
    assert rank_peak < 0.6 * whole_peak, f"rank peak {rank_peak / MB:.0f} MB vs whole {whole_peak / MB:.0f} MB"
    assert rank_peak < rank + 24 * MB, f"rank peak {rank_peak / MB:.0f} MB for {rank / MB:.0f} MB of weights"


def test_slices_of_a_megatron_checkpoint(tmp_path, cli):
    # Two TP files with a padded vocabulary: read whole through the plan (merged, trimmed), then cut.
    # Biases everywhere: megatron-core's add_bias_linear cannot bias the attention output without the MLP.
    hf = build_hf("llama", tmp_path / "hf", attention_bias=True, mlp_bias=True)
    assert cli("convert", "hf-to-megatron", hf, tmp_path / "meg", "--tp", "2").code == 0
    megatron = check_shards(tmp_path / "meg", 2)
    from_hf = [shard_state(open_checkpoint(hf), r, 2) for r in range(2)]
    for mine, theirs in zip(megatron, from_hf):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
