"""rosetool's Megatron output and input checked against megatron-core's own GPTModel on CPU."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="CI installs megatron-core==0.16.1; these tests need it")

import megatron_ref as ref

from rosetool.cli.app import main

IDS = torch.tensor([[0, 5, 17, 99, 42, 3, 64, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
RANK0 = "release/mp_rank_00/model_optim_rng.pt"


def cli(*argv: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 0


@pytest.fixture(scope="module", autouse=True)
def mcore() -> Iterator[None]:
    """One gloo process of world size 1 for the module; CUDA patches undone afterwards."""
    with ref.single_process():
        yield


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "qwen3"])
def test_hf_to_megatron_matches_transformers(tmp_path: Path, kind: str) -> None:
    hf = ref.tiny_hf(kind, tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg")
    got = ref.logits_from_rank_file(tmp_path / "mg" / RANK0, IDS)
    assert got.shape[-1] == 128    # padded to make_vocab_size_divisible_by
    torch.testing.assert_close(got[..., :100], ref.hf_logits(hf, IDS), atol=1e-4, rtol=0)


def _megatron_lm_args() -> argparse.Namespace:
    """Args as Megatron-LM saves them for a Llama-style run: no rosetool fields at all."""
    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=112, num_attention_heads=4, num_query_groups=2,
        group_query_attention=True, kv_channels=16, max_position_embeddings=64, padded_vocab_size=128,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=1e-6, swiglu=True, openai_gelu=False,
        position_embedding_type="rope", rotary_base=10000, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, params_dtype=torch.float32)


def _save_torch(model: torch.nn.Module, args: argparse.Namespace, folder: Path, iteration: int) -> None:
    """Save as Megatron-LM does with --ckpt-format torch (one rank: TP=1, PP=1)."""
    rank = folder / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    rank.parent.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model.state_dict()}, rank)


@pytest.mark.parametrize("save", [_save_torch, ref.save_torch_dist], ids=["torch", "torch_dist"])
def test_megatron_core_checkpoint_to_hf(tmp_path: Path, save) -> None:
    from transformers import AutoModelForCausalLM
    args = _megatron_lm_args()
    model = ref.build_model(args)
    save(model, args, tmp_path / "mg", 10)
    cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", 100)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == 100
    torch.testing.assert_close(ref.hf_logits(hf, IDS), ref.logits(model, IDS)[..., :100], atol=1e-4, rtol=0)


def test_tp2_shards_run_in_two_process_gloo(tmp_path: Path) -> None:
    hf = ref.tiny_hf("llama", tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "tp2", "--tp", 2)
    out = tmp_path / "logits.pt"
    ranks = str(tmp_path / "tp2" / "release")
    torch.multiprocessing.spawn(ref.tp_worker, args=(2, ranks, IDS, str(out), ref.free_port()),
                                nprocs=2, join=True)
    got = torch.load(out)
    assert got.shape[-1] == 256    # padded to 128 * TP
    torch.testing.assert_close(got[..., :100], ref.hf_logits(hf, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_to_torch_dist_loads_through_megatron_core(tmp_path: Path, kind: str) -> None:
    hf = ref.tiny_hf(kind, tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--format", "torch_dist")
    got = ref.logits(ref.load_torch_dist(tmp_path / "mg" / "release"), IDS)
    torch.testing.assert_close(got[..., :100], ref.hf_logits(hf, IDS), atol=1e-4, rtol=0)
