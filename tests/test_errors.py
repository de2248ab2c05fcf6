"""Bad input gets one line naming the file and the tensor, exit 2, no traceback; sources stay untouched."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf
from rosetool.converters import api


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def src(gpt2_hf, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(gpt2_hf, folder)
    return folder


def edit_weights(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def assert_one_line_error(res, *fragments):
    assert res.code == 2, (res.out, res.err)
    lines = [line for line in res.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.err
    assert "Traceback" not in res.err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_unknown_architecture(src, tmp_path, cli):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["MysteryForCausalLM"], model_type="mystery")
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"),
                          "config.json", "unknown architecture (MysteryForCausalLM)", "GPT2LMHeadModel")


def test_missing_tensor(src, tmp_path, cli):
    edit_weights(src, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"),
                          str(src), "missing tensor 'transformer.h.1.mlp.c_fc.weight'")


def test_unexpected_tensor(src, tmp_path, cli):
    edit_weights(src, lambda s: s.update({"transformer.h.0.adapter.weight": torch.zeros(2)}))
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"),
                          "model.safetensors", "unexpected tensor 'transformer.h.0.adapter.weight'")


def test_shape_mismatch(src, tmp_path, cli):
    edit_weights(src, lambda s: s.update({"transformer.wpe.weight": torch.zeros(63, 64)}))
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"),
                          "model.safetensors", "'transformer.wpe.weight' has shape [63, 64], config implies [64, 64]")


def test_truncated_safetensors(src, tmp_path, cli):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"), "model.safetensors", "truncated: tensor")


def test_corrupt_safetensors_header(src, tmp_path, cli):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    assert_one_line_error(cli("inspect", src), "model.safetensors", "corrupt safetensors header")


def test_folder_that_is_no_checkpoint(tmp_path, cli):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    assert_one_line_error(cli("inspect", tmp_path / "notes"), "notes", "not a checkpoint rosetool knows")


def test_unsafe_pickle_is_refused_without_running_it(tmp_path, cli):
    folder = build_hf("gpt2", tmp_path / "pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({**state, "evil": Evil()}, folder / "pytorch_model.bin")
    assert_one_line_error(cli("convert", "hf-to-native", folder, tmp_path / "out"),
                          "pytorch_model.bin", "refused an unsafe pickle")
    assert not marker.exists()


def test_unsupported_config_is_refused_by_name(src, tmp_path, cli):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "out"), "scale_attn_by_inverse_layer_idx")


def test_unimplemented_rope_scaling_is_refused_by_name(tmp_path, cli):
    folder = build_hf("llama", tmp_path / "dyn", rope_scaling={"rope_type": "dynamic", "factor": 4.0,
                                                                "original_max_position_embeddings": 32})
    assert_one_line_error(cli("convert", "hf-to-native", folder, tmp_path / "out"), "rope_scaling type 'dynamic'")


def test_non_empty_destination_needs_force_and_source_is_untouched(src, tmp_path, cli):
    before = digest(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_one_line_error(cli("convert", "hf-to-native", src, dst), "destination is not empty", "--force")
    assert (dst / "keep.txt").exists()
    assert cli("convert", "hf-to-native", src, dst, "--force").code == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert_one_line_error(cli("convert", "hf-to-native", src, src / "inside"), "overlaps the source")
    assert digest(src) == before


def test_interrupted_conversion_leaves_no_destination(src, tmp_path, monkeypatch):
    from rosetool.converters import sinks

    def fail(self, key, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(sinks.FolderSink, "write", fail)
    with pytest.raises(KeyboardInterrupt):
        api.convert(src, tmp_path / "dst", "native")
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_bad_dtype_and_shard_size(src, tmp_path, cli):
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "o", "--dtype", "float8"), "unknown dtype 'float8'")
    assert_one_line_error(cli("convert", "hf-to-native", src, tmp_path / "o", "--max-shard-size", "lots"), "--max-shard-size")


def test_unknown_hub_id_says_how_to_pass_a_folder(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert_one_line_error(cli("inspect", "nobody/no-such-model"), "nobody/no-such-model", "pass a local folder")


def test_hub_id_resolves_from_the_local_cache(gpt2_hf, tmp_path, cli, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(gpt2_hf, snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    res = cli("inspect", "acme/tiny", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["architecture"] == "gpt2"
