"""Every op composed with its inverse is the identity, and shape tracing agrees with the data."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rosetool.mappings.ops import Chain, Concat, Pad, Permute, Reshape, Split, Stack, Transpose, build_op

dims = st.integers(1, 6)
settings.register_profile("ops", max_examples=60, deadline=None)
settings.load_profile("ops")


def roundtrip(chain: Chain, xs: list[torch.Tensor]) -> None:
    trace = chain.trace([x.shape for x in xs])
    ys = chain.forward(xs)
    assert [y.shape for y in ys] == trace[-1]
    back = chain.inverse(ys, trace)
    assert len(back) == len(xs)
    for a, b in zip(xs, back):
        assert torch.equal(a, b)


@given(dims, dims)
def test_transpose(a, b):
    roundtrip(Chain((Transpose(),)), [torch.randn(a, b)])


@given(st.lists(dims, min_size=1, max_size=4), dims, st.integers(0, 1))
def test_concat_of_uneven_parts(rows, width, dim):
    xs = [torch.randn(r, width) if dim == 0 else torch.randn(width, r) for r in rows]
    roundtrip(Chain((Concat(dim),)), xs)


@given(st.lists(dims, min_size=1, max_size=4), dims)
def test_split_by_sizes(sizes, width):
    roundtrip(Chain((Split(0, tuple(sizes)),)), [torch.randn(sum(sizes), width)])


@given(dims, dims, dims)
def test_head_interleave_reshape_permute(groups, per_group, head_dim):
    """The Megatron-style QKV interleave: [3, heads, d, h] <-> [heads, 3, d, h]."""
    hidden = 8
    q, k, v = (torch.randn(groups * per_group * head_dim, hidden) for _ in range(3))
    chain = Chain((Concat(0), Reshape((3, groups * per_group, head_dim, hidden)), Permute((1, 0, 2, 3)),
                   Reshape((-1, hidden))))
    roundtrip(chain, [q, k, v])


@given(dims, st.integers(0, 5), dims)
def test_pad_then_trim(vocab, extra, width):
    x = torch.randn(vocab, width)
    chain = Chain((Pad(vocab + extra),))
    roundtrip(chain, [x])
    assert torch.count_nonzero(chain.forward([x])[0][vocab:]) == 0


def test_fused_conv1d_chain_from_yaml_spelling():
    env = {"n": 4}
    chain = Chain((build_op({"concat": 0}, env), build_op("transpose", env), build_op({"pad": {"size": "n * 3"}}, env)))
    roundtrip(chain, [torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)])


def test_trace_rejects_mismatched_concat():
    import pytest
    with pytest.raises(ValueError, match="mismatched"):
        Chain((Concat(0),)).trace([torch.Size([2, 3]), torch.Size([2, 4])])


@given(st.integers(1, 5), st.integers(1, 3), dims, dims)
def test_stack_experts(experts, parts, rows, width):
    """Expert-major inputs (gate_0, up_0, gate_1, ...) <-> one [E, parts*rows, width] tensor."""
    xs = [torch.randn(rows, width) for _ in range(experts * parts)]
    chain = Chain((Stack(parts),))
    roundtrip(chain, xs)
    fused = chain.forward(xs)[0]
    assert torch.equal(fused[experts - 1], torch.cat(xs[-parts:]))
    assert torch.equal(fused.flatten(), torch.cat([x.flatten() for x in xs]))   # inputs end to end in bytes


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 5), st.integers(1, 4), st.integers(1, 3))
def test_pair_tail_pairs_the_halves_of_each_blocks_tail(blocks, head, half, width):
    """Rows [nope | a_0..a_n-1 | b_0..b_n-1] per block become [nope | a_0 b_0 a_1 b_1 ..]; the inverse undoes it."""
    size = 2 * half
    x = torch.randn(blocks * (head + size), width)
    op = build_op({"pair_tail": {"blocks": "h", "size": "r"}}, {"h": blocks, "r": size})
    (y,) = op.forward([x])
    for b in range(blocks):
        src, dst = x[b * (head + size):(b + 1) * (head + size)], y[b * (head + size):(b + 1) * (head + size)]
        assert torch.equal(dst[:head], src[:head])
        assert torch.equal(dst[head::2], src[head:head + half]) and torch.equal(dst[head + 1::2], src[head + half:])
    assert torch.equal(op.inverse([y], [x.shape])[0], x)
    assert torch.equal(build_op({"pair_tail": {"blocks": 1, "size": 0}}, {}).forward([x])[0], x)
