"""MoE checkpoints in Megatron's torch_dist format, against megatron-core's own dist_checkpointing.

megatron-core stores every expert of a layer as one [num_experts, ...] tensor by global expert number,
stacked over layers when every layer is MoE and keyed per layer when dense layers mix in. Both shapes
are made here by megatron-core itself (one process, and two expert-parallel processes), converted to HF
and compared by logits; rosetool's own torch_dist output is loaded back by megatron-core (strict) and
round-trips to HF and through the torch format bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="CI installs megatron-core==0.16.1; these tests need it")

import megatron_ref as ref
from moe_models import build_moe_hf
from test_moe_mcore import IDS, VOCAB, hf_logits, megatron_lm_args
from test_moe_megatron import error_line, run, same_hf

from rosetool.converters.megatron.dist import read_metadata


def ok(*argv: object) -> None:
    assert run(*argv) == 0


@pytest.fixture(scope="module")
def mcore() -> Iterator[None]:
    with ref.single_process():
        yield


def dist_args(kind: str, ep: int = 1) -> argparse.Namespace:
    args = megatron_lm_args(kind, ep)
    args.ckpt_format = "torch_dist"
    return args


@pytest.mark.parametrize("kind", ["mixtral", "qwen2", "qwen3"])
def test_megatron_core_torch_dist_save_converts_to_hf(mcore, tmp_path: Path, kind: str) -> None:
    """mixtral: every layer MoE, so megatron-core stacks layers; qwen2/qwen3 mix dense layers in, keyed per layer."""
    args = dist_args(kind)
    model = ref.build_model(args)
    ref.randomise(model)
    ref.save_torch_dist(model, args, tmp_path / "mg", 3)
    stored = read_metadata(tmp_path / "mg" / "iter_0000003").state_dict_metadata
    fc1 = [k for k in stored if k.endswith(".experts.experts.linear_fc1.weight")]
    assert fc1 == (["decoder.layers.mlp.experts.experts.linear_fc1.weight"] if kind == "mixtral" else fc1) and fc1
    ok("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), ref.logits(model, IDS)[..., :VOCAB], atol=1e-4, rtol=0)
    ok("verify", tmp_path / "mg", tmp_path / "hf")    # the runtime on megatron-core's files vs transformers


def test_megatron_core_ep2_torch_dist_save_gathers_every_expert(tmp_path: Path) -> None:
    """Two EP ranks save their own experts (different seeds) into one torch_dist checkpoint."""
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.ep_worker, args=(2, str(tmp_path / "mg"), IDS, str(out), ref.free_port(),
                                                     dist_args("qwen2", ep=2), True), nprocs=2, join=True)
    ok("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "hf", "--vocab-size", VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), torch.load(out)[..., :VOCAB], atol=1e-4, rtol=0)


CASES = {   # moe_models case -> overrides: all-MoE (stacked), dense layer by list, by sparse step
    "mixtral": {"num_local_experts": 4},
    "qwen2_moe": {"mlp_only_layers": [1]},
    "qwen3_moe": {"decoder_sparse_step": 2},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_torch_dist_loads_strictly_in_megatron_core(mcore, tmp_path: Path, case: str) -> None:
    src = build_moe_hf(case, tmp_path / "hf", **CASES[case])
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--format", "torch_dist")
    model = ref.load_torch_dist(tmp_path / "mg" / "release")     # strict=True inside
    torch.testing.assert_close(ref.logits(model, IDS)[..., :VOCAB], hf_logits(src), atol=1e-4, rtol=0)


def test_hf_to_torch_dist_loads_in_two_process_expert_parallel_megatron_core(tmp_path: Path) -> None:
    src = build_moe_hf("qwen2_moe", tmp_path / "hf", num_experts=4, mlp_only_layers=[2])
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--format", "torch_dist", "--ep", 2)
    out = tmp_path / "logits.pt"
    torch.multiprocessing.spawn(ref.ep_worker, args=(2, str(tmp_path / "mg" / "release"), IDS, str(out),
                                                     ref.free_port(), None, True), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out)[..., :VOCAB], hf_logits(src), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_torch_dist_torch_hf_is_bit_identical(tmp_path: Path, case: str) -> None:
    """HF -> torch_dist -> HF, and torch_dist -> torch format at TP2 x EP2 x PP3 -> HF."""
    src = build_moe_hf(case, tmp_path / "hf", **CASES[case])
    ok("convert", "hf-to-megatron", src, tmp_path / "dist", "--format", "torch_dist", "--tp", 2, "--ep", 2)
    ok("convert", "megatron-to-hf", tmp_path / "dist", tmp_path / "back")
    same_hf(src, tmp_path / "back")
    ok("reshard", tmp_path / "dist", tmp_path / "torch", "--tp", 2, "--ep", 2, "--pp", 3)
    assert (tmp_path / "torch" / "release" / "mp_rank_01_002_001" / "model_optim_rng.pt").is_file()
    ok("convert", "megatron-to-hf", tmp_path / "torch", tmp_path / "back2")
    same_hf(src, tmp_path / "back2")


def _set_args(folder: Path, **changes: object) -> None:
    """Args as Megatron-LM would save them (without rosetool's copy of the config), changed."""
    blob = torch.load(folder / "common.pt", weights_only=False)
    vars(blob["args"]).pop("rosetool_config")
    vars(blob["args"]).update(changes)
    torch.save(blob, folder / "common.pt")


def test_damaged_torch_dist_moe_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = build_moe_hf("mixtral", tmp_path / "hf", num_local_experts=4)
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--format", "torch_dist")
    good = tmp_path / "mg"
    more = tmp_path / "more_experts"
    shutil.copytree(good, more)
    _set_args(more / "release", num_experts=8)     # args claim experts the tensors do not hold
    capsys.readouterr()
    assert run("convert", "megatron-to-hf", more, tmp_path / "out1") == 2
    line = error_line(capsys)
    # the count is checked against the stored tensors before any per-expert structure is built
    assert ("common.pt: config says num_experts=8, but tensor "
            "'decoder.layers.2.mlp.experts.experts.linear_fc1.weight7' of expert 7 is missing") in line
    cut = tmp_path / "truncated"
    shutil.copytree(good, cut)
    data = sorted((cut / "release").glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capsys.readouterr()
    assert run("convert", "megatron-to-hf", cut, tmp_path / "out2") == 2
    assert "truncated" in error_line(capsys)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
