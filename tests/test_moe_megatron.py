"""MoE <-> Megatron: any TP x EP x PP both ways, every expert where it belongs, bad layouts refused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_models import build_moe_hf
from rosetool.cli.app import main
from rosetool.converters.megatron.unpickler import load_rank_file

E = 4   # experts in every model here, so EP 1, 2 and 4 all divide it


def run(*argv: object) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def ok(*argv: object) -> None:
    assert run(*argv) == 0


def hf(name: str, folder: Path, **overrides) -> Path:
    experts = {"num_local_experts": E} if name == "mixtral" else {"num_experts": E}
    return build_moe_hf(name, folder, num_hidden_layers=4, **experts, **overrides)


def same_hf(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def rank_model(folder: Path, rank_dir: str) -> dict[str, torch.Tensor]:
    return load_rank_file(folder / "release" / rank_dir / "model_optim_rng.pt")["model"]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name,flags", [("mixtral", []), ("qwen2_moe", []), ("qwen3_moe", ["--te-layout"]),
                                        ("mixtral", ["--te-layout"])])
def test_hf_megatron_hf_is_bit_identical_at_tp2_ep2_pp2(tmp_path: Path, name: str, flags: list[str]) -> None:
    src = hf(name, tmp_path / "hf", **({"mlp_only_layers": [2]} if name == "qwen2_moe" else {}))
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--tp", 2, "--ep", 2, "--pp", 2, *flags)
    dirs = sorted(p.name for p in (tmp_path / "mg" / "release").iterdir())
    assert dirs == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    ok("reshard", tmp_path / "mg", tmp_path / "one", "--tp", 1, "--ep", 1, "--pp", 1)
    assert sorted(p.name for p in (tmp_path / "one" / "release").iterdir()) == ["mp_rank_00"]
    ok("convert", "megatron-to-hf", tmp_path / "one", tmp_path / "back")
    same_hf(src, tmp_path / "back")
    ok("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "direct")
    same_hf(src, tmp_path / "direct")


@pytest.mark.parametrize("te", [False, True])
def test_every_expert_on_every_ep_rank_is_its_own_source_expert(tmp_path: Path, te: bool) -> None:
    """Megatron-LM's HF -> mcore Mixtral converter left experts at their init: check each one, by value."""
    src = hf("mixtral", tmp_path / "hf", seed=7)
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--ep", 2, *(["--te-layout"] if te else []))
    w = load_file(src / "model.safetensors")
    per_rank = E // 2
    seen = set()
    for ep in range(2):
        model = rank_model(tmp_path / "mg", f"mp_rank_00_{ep:03d}")
        for layer in range(4):
            for j in range(per_rank):
                e = ep * per_rank + j
                hf_e = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                fc1, fc2 = ((f"decoder.layers.{layer}.mlp.experts.linear_fc{n}.weight{j}" for n in (1, 2)) if te else
                            (f"decoder.layers.{layer}.mlp.experts.local_experts.{j}.linear_fc{n}.weight" for n in (1, 2)))
                assert torch.equal(model[fc1], torch.cat([w[f"{hf_e}.w1.weight"], w[f"{hf_e}.w3.weight"]]))
                assert torch.equal(model[fc2], w[f"{hf_e}.w2.weight"])
                seen.add((layer, e))
            assert f"decoder.layers.{layer}.mlp.experts.local_experts.{per_rank}.linear_fc1.weight" not in model
            assert torch.equal(model[f"decoder.layers.{layer}.mlp.router.weight"],
                               w[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
    assert len(seen) == 4 * E
    args = load_rank_file(tmp_path / "mg" / "release" / "mp_rank_00_000" / "model_optim_rng.pt")["args"]
    assert (args.num_experts, args.moe_router_topk, args.expert_model_parallel_size) == (E, 2, 2)
    assert args.moe_ffn_hidden_size == 20 and args.moe_router_pre_softmax is False and args.moe_grouped_gemm == te


def test_reshard_between_ep_1_2_4_round_trips(tmp_path: Path) -> None:
    src = hf("qwen2_moe", tmp_path / "hf", mlp_only_layers=[0, 3])
    ok("convert", "hf-to-megatron", src, tmp_path / "ep1")
    previous = tmp_path / "ep1"
    for i, (ep, tp) in enumerate([(2, 1), (4, 2), (1, 2), (1, 1)]):
        ok("reshard", previous, tmp_path / f"step{i}", "--ep", ep, "--tp", tp)
        previous = tmp_path / f"step{i}"
    a, b = rank_model(tmp_path / "ep1", "mp_rank_00"), rank_model(previous, "mp_rank_00")
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert (v is None and b[k] is None) or torch.equal(v, b[k]), k
    assert "decoder.layers.0.mlp.linear_fc1.weight" in a and "decoder.layers.0.mlp.router.weight" not in a
    assert "decoder.layers.0.mlp.linear_fc1._extra_state" in a
    assert "decoder.layers.1.mlp.shared_experts.gate_weight" in a and "decoder.layers.1.mlp.linear_fc1._extra_state" not in a
    ok("convert", "megatron-to-hf", tmp_path / "step1", tmp_path / "back")   # from EP=4, TP=2
    same_hf(src, tmp_path / "back")


def test_inspect_shows_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = hf("qwen2_moe", tmp_path / "hf", mlp_only_layers=[1])
    ok("convert", "hf-to-megatron", src, tmp_path / "mg", "--ep", 2)
    for path in (src, tmp_path / "mg"):
        capsys.readouterr()
        ok("inspect", path)
        text = capsys.readouterr().out
        assert f"{E} experts, top-3" in text and "sigmoid gate" in text and "[0, 2, 3] (dense: [1])" in text


@pytest.fixture()
def ep2(tmp_path: Path) -> Path:
    ok("convert", "hf-to-megatron", hf("mixtral", tmp_path / "hf"), tmp_path / "mg", "--ep", 2)
    return tmp_path / "mg"


def _edit(rank_dir: str, change) -> Callable[[Path], None]:
    def damage(mg: Path) -> None:
        path = mg / "release" / rank_dir / "model_optim_rng.pt"
        blob = load_rank_file(path)
        change(blob["model"])
        torch.save(blob, path.with_suffix(".new"))
        path.with_suffix(".new").replace(path)
    return damage


_FC2 = "decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"
_FC1 = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"


@pytest.mark.parametrize("damage,expected", [
    (_edit("mp_rank_00_001", lambda m: m.pop(_FC2)), ["mp_rank_00_001/model_optim_rng.pt", _FC2, "missing"]),
    (_edit("mp_rank_00_001", lambda m: m.__setitem__("decoder.layers.0.mlp.experts.linear_fc1.weight0", m.pop(_FC1))),
     ["mp_rank_00_001/model_optim_rng.pt", "linear_fc1.weight0", "mixes expert layouts"]),
    (lambda mg: shutil.rmtree(mg / "release" / "mp_rank_00_001"),
     ["mp_rank_00_001/model_optim_rng.pt: missing rank file", "EP=2"]),
], ids=["expert-missing-on-one-ep-rank", "mixed-expert-layouts", "missing-ep-rank-folder"])
def test_damaged_ep_checkpoints_fail_in_one_line(ep2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 damage, expected: list[str]) -> None:
    damage(ep2)
    capsys.readouterr()
    assert run("convert", "megatron-to-hf", ep2, tmp_path / "out") == 2
    line = error_line(capsys)
    assert all(part in line for part in expected), line


@pytest.mark.parametrize("name,flags,message", [
    ("mixtral", ("--ep", 3), f"{E} experts cannot be split evenly over EP=3"),
    ("olmoe", ("--ep", 2), "qk_norm_full_width"),
])
def test_layouts_and_models_megatron_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 name, flags, message) -> None:
    src = hf(name, tmp_path / "hf")
    capsys.readouterr()
    assert run("convert", "hf-to-megatron", src, tmp_path / "mg", *flags) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "mg").exists()


def test_ep_on_a_dense_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import megatron_ref as ref
    ref.tiny_hf("llama", tmp_path / "hf")
    capsys.readouterr()
    assert run("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--ep", 2) == 2
    assert "needs a mixture-of-experts model" in error_line(capsys)

