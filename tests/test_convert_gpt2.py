"""GPT-2: HF -> native parity with transformers, bit-identical round trips, export and sharding."""

import json

import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf, hf_logits, runtime_logits
from rosetool.converters.api import convert, export_hf


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_hf_to_native_logits_match_transformers(gpt2_hf, tmp_path, cli):
    res = cli("convert", "hf-to-native", gpt2_hf, tmp_path / "native")
    assert res.code == 0, res.err
    tokens = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
    diff = (hf_logits(gpt2_hf, tokens) - runtime_logits(tmp_path / "native", tokens)).abs().max()
    assert diff < 1e-4
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["format"] == "rosetool-native" and cfg["architecture"] == "gpt2"
    assert "layers.0.attn.qkv.weight" in all_tensors(tmp_path / "native")


def test_native_to_hf_round_trip_is_bit_identical(gpt2_hf, tmp_path):
    convert(gpt2_hf, tmp_path / "native", "native")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    a, b = all_tensors(gpt2_hf), all_tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_export_reloads_in_transformers_with_same_logits(gpt2_hf, tmp_path, cli):
    convert(gpt2_hf, tmp_path / "native", "native")
    res = cli("export-hf", tmp_path / "native", tmp_path / "export", "--max-shard-size", "100KB")
    assert res.code == 0, res.err
    shards = sorted(p.name for p in (tmp_path / "export").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "export" / "model.safetensors.index.json").exists()
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2" and cfg["dtype"] == "float32"
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == 1
    tokens = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(hf_logits(gpt2_hf, tokens), hf_logits(tmp_path / "export", tokens))


def test_dtype_cast_and_pytorch_bin_source_without_prefix(tmp_path):
    """Old hub layout: pytorch_model.bin, keys without `transformer.`, mask buffers present."""
    src = build_hf("gpt2", tmp_path / "hf")
    state = {k.removeprefix("transformer."): v for k, v in all_tensors(src).items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    convert(src, tmp_path / "half", "native", dtype="bfloat16")
    out = all_tensors(tmp_path / "half")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(out["embed.weight"], state["wte.weight"].to(torch.bfloat16))


def test_tokenizer_and_generation_files_are_carried(gpt2_hf, tmp_path):
    src = tmp_path / "src"
    convert(gpt2_hf, src, "hf")
    (src / "tokenizer.json").write_text("{}")
    convert(src, tmp_path / "native", "native")
    assert (tmp_path / "native" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "native" / "generation_config.json").exists()


def test_sharded_safetensors_source_is_read(gpt2_hf, tmp_path):
    export_hf(gpt2_hf, tmp_path / "sharded", max_shard_size=50_000)
    convert(tmp_path / "sharded", tmp_path / "native", "native")
    tokens = torch.randint(0, 100, (1, 9))
    assert (hf_logits(gpt2_hf, tokens) - runtime_logits(tmp_path / "native", tokens)).abs().max() < 1e-4


def test_stream_writer_output_is_standard_safetensors(tmp_path):
    from rosetool.converters.safetensors_io import StreamWriter, read_header, read_tensor
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "empty": torch.zeros(0, 4)}
    w = StreamWriter(tmp_path / "x.safetensors", [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    for k in reversed(list(tensors)):
        w.write(k, tensors[k])
    w.close()
    loaded = load_file(tmp_path / "x.safetensors")
    infos, _ = read_header(tmp_path / "x.safetensors")
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t) and torch.equal(read_tensor(infos[k]), t)
    save_file(tensors, tmp_path / "ref.safetensors")
    assert read_header(tmp_path / "ref.safetensors")[0].keys() == tensors.keys()
