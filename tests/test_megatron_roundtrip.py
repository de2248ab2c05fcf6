"""Megatron round trips, resharding and legacy spellings: bit-identical, no megatron-core needed."""

from __future__ import annotations

from pathlib import Path

import megatron_ref as ref
import pytest
import torch
from safetensors.torch import load_file

from rosetool.cli.app import main
from rosetool.converters.megatron.unpickler import load_rank_file


def cli(*argv: object) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 0


def rank_model(folder: Path, rank_dir: str = "mp_rank_00") -> dict[str, torch.Tensor]:
    return load_rank_file(folder / "release" / rank_dir / "model_optim_rng.pt")["model"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[k]), k
        else:
            assert value == b[k], k


@pytest.mark.parametrize("kind,flags", [("gpt2", ["--legacy"]), ("llama", ["--te-layout"]), ("llama", []),
                                        ("gpt2", ["--format", "torch_dist"])])
def test_hf_megatron_hf_is_bit_identical(tmp_path: Path, kind: str, flags: list[str]) -> None:
    ref.tiny_hf(kind, tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2, "--pp", 2, *flags)
    cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"),
                        load_file(tmp_path / "back" / "model.safetensors"))


def test_padded_vocab_kept_in_megatron_and_trimmed_on_export(tmp_path: Path) -> None:
    ref.tiny_hf("llama", tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2)
    shard = rank_model(tmp_path / "mg", "mp_rank_01")["embedding.word_embeddings.weight"]
    assert shard.shape == (128, 64) and not shard[100 - 128:].any()    # rows 100..255 are padding, on rank 1
    cli("export-hf", tmp_path / "mg", tmp_path / "back")
    assert load_file(tmp_path / "back" / "model.safetensors")["model.embed_tokens.weight"].shape == (100, 64)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tp2_pp2_merge_back_to_the_tp1_original(tmp_path: Path, kind: str) -> None:
    ref.tiny_hf(kind, tmp_path / "hf", tie=kind == "llama")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "tp1")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "tp2pp2", "--tp", 2, "--pp", 2)
    last = load_rank_file(tmp_path / "tp2pp2" / "release" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in last    # stage-local numbering
    assert "output_layer.weight" in last                       # the tied head's copy on the last stage
    cli("reshard", tmp_path / "tp2pp2", tmp_path / "merged")
    assert_same_tensors(rank_model(tmp_path / "tp1"), rank_model(tmp_path / "merged"))


def _to_old_legacy(path: Path, version: float) -> None:
    """Rewrite a rank file as an old Megatron-LM did: old key spellings and pre-2.0 QKV order."""
    blob = load_rank_file(path)
    lm = blob["model"]["language_model"]
    lm["transformer"] = {k.replace("input_norm", "input_layernorm").replace("self_attention.", "attention.")
                         .replace("post_attention_norm", "post_attention_layernorm")
                         .replace("final_norm", "final_layernorm"): v for k, v in lm.pop("encoder").items()}
    for key, t in lm["transformer"].items():
        if "query_key_value" in key:
            heads = t.shape[0] // (3 * 16)
            grouped = t.view(heads, 3, 16, *t.shape[1:])
            lm["transformer"][key] = (grouped.transpose(0, 1) if version == 0 else grouped.transpose(1, 2)).reshape(t.shape)
    blob["checkpoint_version"] = version
    torch.save(blob, path.with_suffix(".new"))    # not in place: the loaded tensors map the old file
    path.with_suffix(".new").replace(path)


@pytest.mark.parametrize("version", [0, 1.0])
def test_old_legacy_spellings_and_qkv_orders(tmp_path: Path, version: float) -> None:
    ref.tiny_hf("gpt2", tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2, "--legacy")
    for rank in ("mp_rank_00", "mp_rank_01"):
        _to_old_legacy(tmp_path / "mg" / "release" / rank / "model_optim_rng.pt", version)
    cli("convert", "megatron-to-hf", tmp_path / "mg", tmp_path / "back")
    assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"),
                        load_file(tmp_path / "back" / "model.safetensors"))


def test_runtime_and_inspect_read_megatron_directly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from rosetool.converters.api import load_state
    ref.tiny_hf("llama", tmp_path / "hf")
    cli("convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mg", "--tp", 2, "--pp", 2)
    _, want = load_state(tmp_path / "hf")
    _, got = load_state(tmp_path / "mg")
    assert_same_tensors(want, got)
    capsys.readouterr()
    cli("inspect", tmp_path / "mg", "--json")
    info = json.loads(capsys.readouterr().out)["info"]
    assert info["iteration"] == "release" and (info["megatron"]["tp"], info["megatron"]["pp"]) == (2, 2)
    assert info["ranks"]["release/mp_rank_01_001/model_optim_rng.pt"]["output_layer.weight"] == [128, 64]   # 256 padded rows / TP 2
