"""MoE checkpoints against megatron-core's own GPTModel with experts (local spec, SequentialMLP) on CPU.

Both directions: rosetool's HF -> Megatron output loads strictly into megatron-core and gives transformers'
logits (one process, and two processes with expert parallelism); checkpoints megatron-core saved itself,
one rank and two EP ranks, convert to HF folders that give megatron-core's logits.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="CI installs megatron-core==0.16.1; these tests need it")

import megatron_ref as ref
from moe_models import build_moe_hf

from rosetool.cli.app import main

IDS = torch.tensor([[0, 5, 17, 60, 42, 3, 64, 8, 11, 2, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 66]])
VOCAB = 67     # moe_models' vocabulary; Megatron pads it to 128


def cli(*argv: object) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 0


def hf_logits(folder: Path) -> torch.Tensor:
    """transformers' per-expert loop (its grouped_mm kernel fails on CPU for these odd widths)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture(scope="module")
def mcore() -> Iterator[None]:
    """One gloo process of world size 1; CUDA patches undone afterwards."""
    with ref.single_process():
        yield


HF_CASES = {   # moe_models case -> overrides: dense layers by list and by sparse step, shared expert + gate
    "mixtral": {},
    "qwen2_moe": {"mlp_only_layers": [1]},
    "qwen3_moe": {"decoder_sparse_step": 2},
    "qwen3_moe_plain_topk": {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [0]},
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_megatron_loads_strictly_and_matches_transformers(mcore, tmp_path: Path, case: str) -> None:
    src = build_moe_hf(case.removesuffix("_plain_topk"), tmp_path / "hf", **HF_CASES[case])
    cli("convert", "hf-to-megatron", src, tmp_path / "mg")
    args, state = ref.load_rank(tmp_path / "mg" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    model = ref.build_model(args)
    model.load_state_dict(state, strict=True)
    experts = [k for k in state if ".mlp.experts.local_experts." in k and k.endswith(".weight")]
    moe_layers = sum(hasattr(layer.mlp, "router") for layer in model.decoder.layers)
    assert 0 < moe_layers < args.num_layers or case == "mixtral"
    assert len(experts) == 2 * args.num_experts * moe_layers
    got = ref.logits(model, IDS)
    assert got.shape[-1] == 128
    torch.testing.assert_close(got[..., :VOCAB], hf_logits(src), atol=1e-4, rtol=0)


def test_hf_to_megatron_ep2_runs_in_two_process_expert_parallel_megatron_core(tmp_path: Path) -> None:
    src = build_moe_hf("qwen2_moe", tmp_path / "hf", num_experts=4, mlp_only_layers=[2])
    cli("convert", "hf-to-megatron", src, tmp_path / "mg", "--ep", 2)
    out = tmp_path / "logits.pt"
    ranks = str(tmp_path / "mg" / "release")
    torch.multiprocessing.spawn(ref.ep_worker, args=(2, ranks, IDS, str(out), ref.free_port()), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out)[..., :VOCAB], hf_logits(src), atol=1e-4, rtol=0)


def megatron_lm_args(kind: str, ep: int = 1) -> argparse.Namespace:
    """Args as Megatron-LM saves them for an MoE run: its own fields only, nothing rosetool wrote."""
    moe = {
        "mixtral": dict(moe_router_pre_softmax=False, moe_layer_freq=1, add_qkv_bias=False, qk_layernorm=False),
        # Qwen2-MoE style: shared expert with a sigmoid gate, raw top-k probabilities, a dense layer 1
        "qwen2": dict(moe_router_pre_softmax=True, moe_layer_freq=[1, 0, 1], add_qkv_bias=True, qk_layernorm=False,
                      moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True),
        # Qwen3-MoE style: q/k norm; an int moe_layer_freq makes layers 0 and 2 MoE (i % 2 == 0), not HF's
        # decoder_sparse_step=2 (layers 1, 3), so the fold into mlp_only_layers is checked
        "qwen3": dict(moe_router_pre_softmax=False, moe_layer_freq=2, add_qkv_bias=False, qk_layernorm=True),
    }[kind]
    return argparse.Namespace(
        num_layers=3, hidden_size=48, ffn_hidden_size=56, num_attention_heads=4, num_query_groups=2,
        group_query_attention=True, kv_channels=12, max_position_embeddings=64, padded_vocab_size=128,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=1e-6, swiglu=True, openai_gelu=False,
        position_embedding_type="rope", rotary_base=10000, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, params_dtype=torch.float32, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=24, expert_model_parallel_size=ep, moe_grouped_gemm=False,
        moe_router_score_function="softmax", moe_token_dispatcher_type="alltoall", **moe)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2", "qwen3"])
def test_megatron_core_moe_checkpoint_converts_to_hf(mcore, tmp_path: Path, kind: str) -> None:
    args = megatron_lm_args(kind)
    model = ref.build_model(args)
    ref.randomise(model)
    ref.save_torch(model, args, tmp_path / "mg", 5)
    cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), ref.logits(model, IDS)[..., :VOCAB], atol=1e-4, rtol=0)


def test_megatron_core_ep2_checkpoint_gathers_every_expert(tmp_path: Path) -> None:
    """megatron-core itself trains and saves with EP=2 (each rank its own experts); HF must get all of them."""
    args = megatron_lm_args("qwen2", ep=2)
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.ep_worker, args=(2, str(tmp_path / "mg"), IDS, str(out), ref.free_port(), args),
                                nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "mg" / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), torch.load(out)[..., :VOCAB], atol=1e-4, rtol=0)
