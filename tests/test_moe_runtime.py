"""The runtime's MoE layer: grouped kernel vs the dense reference, and the layer vs transformers' own blocks."""

import pytest
import torch
import torch.nn.functional as F

from rosetool.canonical import ModelArgs
from rosetool.errors import RosetoolError
from rosetool.runtime.model import MLP, Block
from rosetool.runtime.moe import MoE, Router, _grouped_mm_fits, grouped_experts, reference_experts


def moe_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=40, max_position_embeddings=64, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=24)
    return ModelArgs(**{**base, **overrides})


def route(x: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    experts, hidden = router.shape
    r = Router(moe_args(hidden_size=hidden, num_experts=experts, num_experts_per_tok=k, norm_topk_prob=renormalize))
    r.weight = torch.nn.Parameter(router)
    return r(x)


# (tokens, hidden, ffn, experts, top_k): aligned sizes take F.grouped_mm, odd ones the loop over experts;
# one token leaves most experts empty, top_k == experts routes everything everywhere.
SHAPES = [(37, 64, 32, 8, 2), (37, 30, 21, 5, 3), (1, 64, 48, 8, 2), (9, 20, 12, 4, 4), (6, 16, 8, 1, 1)]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_kernel_matches_reference(shape, renormalize):
    n, hidden, ffn, experts, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, hidden, generator=gen)
    router = torch.randn(experts, hidden, generator=gen) / hidden ** 0.5
    up = torch.randn(experts, 2 * ffn, hidden, generator=gen) / hidden ** 0.5
    down = torch.randn(experts, hidden, ffn, generator=gen) / ffn ** 0.5
    weights, chosen = route(x, router, k, renormalize)
    if renormalize or k == experts:
        assert torch.allclose(weights.sum(-1), torch.ones(n))
    else:
        assert (weights.sum(-1) < 0.999).all()
    ref = reference_experts(x, weights, chosen, up, down, F.silu)
    got = grouped_experts(x, weights, chosen, up, down, F.silu)
    assert (ref - got).abs().max() < 1e-5
    assert ref.abs().max() > 0.1        # a kernel returning zeros would not pass
    if n > 1:
        bf16 = grouped_experts(*(t.bfloat16() for t in (x, weights)), chosen, up.bfloat16(), down.bfloat16(), F.silu)
        assert (bf16.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_both_grouped_paths_are_exercised():
    fits = [_grouped_mm_fits(torch.empty(1, h), torch.empty(e, 2 * f, h), torch.empty(e, h, f))
            for _, h, f, e, _ in SHAPES]
    assert True in fits and False in fits
    assert not _grouped_mm_fits(torch.empty(1, 30), torch.empty(2, 64, 30), torch.empty(2, 30, 32))


def test_route_takes_the_largest_softmax_probabilities_in_fp32():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    router = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    weights, chosen = route(x, router, 2, False)
    probs = torch.softmax(torch.tensor([3.0, 0.0, 1.0]), -1)
    assert chosen.tolist() == [[0, 2], [1, 2]]
    assert torch.allclose(weights[0], probs[[0, 2]])
    renormed, _ = route(x.bfloat16(), router.bfloat16(), 2, True)
    assert renormed.dtype == torch.bfloat16
    assert torch.allclose(renormed[0].float(), probs[[0, 2]] / probs[[0, 2]].sum(), atol=1e-2)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _hf_block(kind: str, **cfg):
    import transformers as tf
    common = dict(hidden_size=cfg.pop("hidden_size"), num_experts_per_tok=cfg.pop("top_k"), hidden_act="silu")
    if kind == "mixtral":
        config = tf.MixtralConfig(num_local_experts=cfg["experts"], intermediate_size=cfg["ffn"], **common)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as block
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(num_experts=cfg["experts"], moe_intermediate_size=cfg["ffn"],
                                   shared_expert_intermediate_size=cfg["shared"], norm_topk_prob=cfg["renorm"],
                                   **common)
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as block
    elif kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=cfg["experts"], moe_intermediate_size=cfg["ffn"],
                                   norm_topk_prob=cfg["renorm"], **common)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as block
    else:
        config = tf.OlmoeConfig(num_experts=cfg["experts"], intermediate_size=cfg["ffn"],
                                norm_topk_prob=cfg["renorm"], **common)
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as block
    return block(config).eval()


def _copy_hf_block(hf, moe: MoE) -> None:
    """HF 5.x holds experts fused in memory as [E, 2*ffn, hidden] ([gate; up]), the native layout too."""
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
        moe.experts.up.weight.copy_(hf.experts.gate_up_proj)
        moe.experts.down.weight.copy_(hf.experts.down_proj)
        if moe.shared is not None:
            s = hf.shared_expert
            moe.shared.up.weight.copy_(torch.cat([s.gate_proj.weight, s.up_proj.weight]))
            moe.shared.down.weight.copy_(s.down_proj.weight)
            moe.shared_gate.weight.copy_(hf.shared_expert_gate.weight)


HF_BLOCKS = [   # kind, hidden, ffn, experts, top_k, renormalise, shared expert width
    ("mixtral", 32, 24, 4, 2, True, 0),
    ("qwen2_moe", 36, 20, 6, 2, False, 44),
    ("qwen2_moe", 32, 16, 5, 3, True, 24),
    ("qwen3_moe", 32, 16, 8, 3, True, 0),
    ("qwen3_moe", 28, 12, 7, 2, False, 0),
    ("olmoe", 32, 24, 8, 2, False, 0),
]


@pytest.mark.parametrize("case", HF_BLOCKS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("kernel", [grouped_experts, reference_experts], ids=["grouped", "reference"])
def test_layer_matches_the_transformers_block(case, kernel):
    kind, hidden, ffn, experts, k, renorm, shared = case
    hf = _hf_block(kind, hidden_size=hidden, top_k=k, experts=experts, ffn=ffn, renorm=renorm, shared=shared)
    _randomise(hf, seed=hidden + experts)
    args = moe_args(hidden_size=hidden, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=ffn,
                    norm_topk_prob=renorm, shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0)
    moe = MoE(args, F.silu, MLP(args, shared) if shared else None)
    _copy_hf_block(hf, moe)
    moe.kernel = kernel
    x = torch.randn(3, 11, hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = hf(x), moe(x)
    assert got.shape == x.shape
    assert (ref - got).abs().max() < 1e-5, (ref - got).abs().max()


def test_block_holds_mlp_or_moe_by_layer_index():
    args = moe_args(num_layers=4, mlp_only_layers=[0, 2], shared_expert_intermediate_size=16,
                    shared_expert_gate=True)
    keys = {i: set(Block(args, i).state_dict()) for i in range(4)}
    assert {k for k in keys[0] if "mlp." in k} == {"mlp.up.weight", "mlp.down.weight"}
    assert not any(k.startswith("moe.") for k in keys[0] | keys[2])
    assert {k for k in keys[1] if k.startswith(("moe.", "mlp."))} == {
        "moe.router.weight", "moe.experts.up.weight", "moe.experts.down.weight", "moe.shared.up.weight",
        "moe.shared.down.weight", "moe.shared_gate.weight"}
    shapes = {k: tuple(v.shape) for k, v in Block(args, 3).state_dict().items()}
    assert shapes["moe.experts.up.weight"] == (6, 48, 32) and shapes["moe.experts.down.weight"] == (6, 32, 24)
    assert shapes["moe.shared.up.weight"] == (32, 32) and shapes["moe.shared_gate.weight"] == (1, 32)
    assert shapes["mlp_norm.weight"] == (32,)


def test_full_width_qk_norm_spans_all_heads():
    args = moe_args(qk_norm=True, qk_norm_full_width=True)
    shapes = {k: tuple(v.shape) for k, v in Block(args, 0).state_dict().items()}
    assert shapes["attn.q_norm.weight"] == (32,) and shapes["attn.k_norm.weight"] == (16,)
    per_head = {k: tuple(v.shape) for k, v in Block(moe_args(qk_norm=True), 0).state_dict().items()}
    assert per_head["attn.q_norm.weight"] == (8,) and per_head["attn.k_norm.weight"] == (8,)


def test_moe_config_defaults_and_layer_kinds():
    args = moe_args(moe_intermediate_size=None, mlp_only_layers=[1])
    assert args.moe_intermediate_size == args.intermediate_size
    assert [args.is_moe_layer(i) for i in range(3)] == [True, False, True]
    dense = ModelArgs.from_dict({**vars(moe_args()), "num_experts": 0})
    assert not any(dense.is_moe_layer(i) for i in range(3))


@pytest.mark.parametrize("bad, message", [
    ({"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok=7"),
    ({"glu": False}, "glu=False"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"shared_expert_gate": True}, "shared_expert_gate"),
    ({"mlp_only_layers": [1, 3]}, "mlp_only_layers [3]"),
    ({"qk_norm_full_width": True}, "needs qk_norm"),
])
def test_moe_config_refusals_name_the_field(bad, message):
    with pytest.raises(RosetoolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        moe_args(**bad)


DEEPSEEK_ROUTERS = [   # version, experts, top_k, groups, top groups, renormalise, scaling (V2: method by groups)
    ("v3", 16, 4, 4, 2, True, 2.5),
    ("v3", 12, 3, 1, 1, False, 1.0),
    ("v3", 12, 2, 6, 3, True, 1.0),
    ("v2", 10, 3, 1, 1, False, 1.0),
    ("v2", 16, 6, 8, 3, False, 16.0),
]


@pytest.mark.parametrize("case", DEEPSEEK_ROUTERS, ids=lambda c: "-".join(map(str, c)))
def test_deepseek_routing_chooses_and_weighs_as_transformers(case):
    """Sigmoid + choice bias + top-2-sum groups (V3) and softmax + best-expert groups (V2) on 200 tokens: the
    same experts (as sets, HF does not sort them) with the same weights."""
    import transformers as tf
    version, experts, k, groups, top, renorm, scale = case
    common = dict(hidden_size=24, num_attention_heads=4, n_routed_experts=experts, num_experts_per_tok=k, n_group=groups,
                  topk_group=top, routed_scaling_factor=scale, norm_topk_prob=renorm)
    if version == "v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as router
        config = tf.DeepseekV3Config(**common)
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as router
        config = tf.DeepseekV2Config(**{**common, "norm_topk_prob": False},
                                     topk_method="group_limited_greedy" if groups > 1 else "greedy")
    hf = router(config)
    args = moe_args(hidden_size=24, num_experts=experts, num_experts_per_tok=k, norm_topk_prob=renorm and version == "v3",
                    router_scoring="sigmoid" if version == "v3" else "softmax", router_bias=version == "v3",
                    router_fp32=True, expert_groups=groups, topk_groups=top, routed_scaling_factor=scale,
                    group_score="top2_sum" if version == "v3" else "max")
    ours = Router(args)
    gen = torch.Generator().manual_seed(experts + k)
    with torch.no_grad():
        ours.weight.copy_(hf.weight.copy_(torch.randn(experts, 24, generator=gen)))
        if version == "v3":
            ours.choice_bias.copy_(hf.e_score_correction_bias.copy_(torch.randn(experts, generator=gen)))
        x = torch.randn(200, 24, generator=gen)
        _, want_w, want_e = hf(x)
        got_w, got_e = ours(x)
    want, got = want_e.sort(-1), got_e.sort(-1)
    assert torch.equal(want.values, got.values)
    assert torch.allclose(want_w.gather(1, want.indices), got_w.gather(1, got.indices), atol=1e-6, rtol=0)
    if version == "v3":   # the bias changed some choices, so it is being used for choosing, not weighing
        plain = Router(moe_args(**{**args.__dict__, "router_bias": False, "mlp_only_layers": []}))
        plain.weight = ours.weight
        assert not torch.equal(plain(x)[1].sort(-1).values, got.values)
