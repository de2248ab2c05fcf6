"""Hostile and unlucky inputs, table-driven: each fails closed with exit 2 and one line naming the file
(and the tensor or field), leaves the source byte-identical and nothing beside the destination, and
payloads that would create a marker file never run."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILY, build_hf

TO_NATIVE = ("convert", "hf-to-native")
QKV0, QKV1 = "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"
WPE = "transformer.wpe.weight"


# ---- reading and writing raw safetensors, so headers can be broken in ways the library refuses to write

def read_raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: object, data: bytes, text: str | None = None) -> None:
    raw = (text if text is not None else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(change: Callable[[dict], object], file: str = "model.safetensors") -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        header, data = read_raw(folder / file)
        result = change(header)
        write_raw(folder / file, header if result is None else result, data)
    return run


def edit_entry(name: str, **fields: object) -> Callable[[Path], None]:
    return edit_header(lambda h: h[name].update(fields))


def edit_json(file: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        result = change(data)
        (folder / file).write_text(json.dumps(data if result is None else result))
    return run


def config_field(key: str, value: object) -> Callable[[Path], None]:
    return edit_json("config.json", lambda c: c.update({key: value}))


def write_bytes(file: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / file).write_bytes(data)


def replace_with_dir(file: str) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        (folder / file).unlink()
        (folder / file).mkdir()
    return run


def replace_with_fifo(file: str) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        (folder / file).unlink()
        os.mkfifo(folder / file)
    return run


def symlink_outside(file: str) -> Callable[[Path], None]:
    """`file` (or folder) becomes a link to a copy of itself just outside the source folder."""
    def run(folder: Path) -> None:
        outside = folder.parent / f"outside-{Path(file).name}"
        if (folder / file).is_dir():
            shutil.copytree(folder / file, outside)
            shutil.rmtree(folder / file)
        else:
            shutil.copy(folder / file, outside)
            (folder / file).unlink()
        (folder / file).symlink_to(os.path.relpath(outside, (folder / file).parent))
    return run


def tensors(change: Callable[[dict], None], file: str = "model.safetensors") -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        state = load_file(folder / file)
        change(state)
        save_file(state, folder / file, metadata={"format": "pt"})
    return run


def poke(name: str, value: float) -> Callable[[dict], None]:
    def run(state: dict) -> None:
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
    return run


def cast_stored(name: str, dtype: torch.dtype) -> Callable[[Path], None]:
    """Tensor `name`, in whichever shard holds it, stored as `dtype`."""
    def run(folder: Path) -> None:
        shard_ = next(p.name for p in folder.glob("*.safetensors") if name in load_file(p))
        tensors(lambda s: s.update({name: s[name].to(dtype)}), shard_)(folder)
    return run


def drop_entry(header: dict) -> None:
    del header["transformer.ln_f.bias"]   # its bytes stay behind: a gap in the data section


def overlap(header: dict) -> None:
    header[QKV1]["data_offsets"] = header[QKV0]["data_offsets"]


# ---- sharded folders: the weights split over two files with an index

def shard(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    half = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in half.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


S1, S2, INDEX = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"


def index_map(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return edit_json(INDEX, lambda doc: change(doc["weight_map"]) and None)


def first_in(folder: Path, file: str) -> str:
    return sorted(load_file(folder / file))[0]


def key_in_two_shards(folder: Path) -> None:
    name = first_in(folder, S1)
    tensors(lambda s: s.update({name: load_file(folder / S1)[name]}), S2)(folder)


def wrong_shard(folder: Path) -> None:
    name = first_in(folder, S1)
    index_map(lambda m: m.update({name: S2}))(folder)


def unlisted_tensor(folder: Path) -> None:
    name = first_in(folder, S1)
    index_map(lambda m: m.pop(name))(folder)


def listed_but_absent(folder: Path) -> None:
    index_map(lambda m: m.update({"transformer.h.0.ghost.weight": S1}))(folder)


def shard_outside(folder: Path) -> None:
    shutil.copy(folder / S2, folder.parent / "evil.safetensors")
    index_map(lambda m: m.update({k: "../evil.safetensors" for k, v in m.items() if v == S2}))(folder)


def shard_absolute(folder: Path) -> None:
    shutil.copy(folder / S2, folder.parent / "evil.safetensors")
    index_map(lambda m: m.update({k: str(folder.parent / "evil.safetensors") for k, v in m.items() if v == S2}))(folder)


# ---- torch_dist: `.metadata` payloads and corruptions

class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalPayload(Payload):
    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def dist_dir(folder: Path) -> Path:
    return folder / "release"


def load_metadata(folder: Path):
    with open(dist_dir(folder) / ".metadata", "rb") as f:
        return pickle.load(f)   # our own test checkpoint, written by rosetool a moment ago


def dump_metadata(folder: Path, obj: object) -> None:
    with open(dist_dir(folder) / ".metadata", "wb") as f:
        pickle.dump(obj, f)


def metadata_payload(kind: type[Payload]) -> Callable[[Path], None]:
    return lambda folder: dump_metadata(folder, {"state_dict_metadata": kind(folder.parent / "pwned")})


def payload_inside_valid_metadata(folder: Path) -> None:
    md = load_metadata(folder)
    md.planner_data = Payload(folder.parent / "pwned")   # a conversion would otherwise succeed
    dump_metadata(folder, md)


def metadata_escape(folder: Path) -> None:
    md = load_metadata(folder)
    for where in md.storage_data.values():
        where.relative_path = "../../outside.distcp"
    dump_metadata(folder, md)


def drop_chunk(folder: Path) -> None:
    md = load_metadata(folder)
    del md.storage_data[next(k for k in md.storage_data if k.fqn == "embedding.word_embeddings.weight")]
    dump_metadata(folder, md)


def zero_records(folder: Path) -> None:
    """Same size, records replaced: DCP's read fails inside torch (a CheckpointException, a BaseException)."""
    path = dist_dir(folder) / distcp_name(folder)
    path.write_bytes(path.read_bytes()[:64] + bytes(path.stat().st_size - 64))


def truncate(file: str, keep: float) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        path = folder / file
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return run


def distcp_name(folder: Path) -> str:
    return next(p.name for p in dist_dir(folder).glob("*.distcp"))


def truncate_distcp(folder: Path) -> None:
    truncate(f"release/{distcp_name(folder)}", 0.5)(folder)


def bin_payload(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "evil": Payload(folder.parent / "pwned")}, folder / "pytorch_model.bin")


def native_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_json("config.json", lambda doc: change(doc["config"]))


def rope_field(key: str, value: object) -> Callable[[Path], None]:
    return edit_json("config.json", lambda c: c["rope_parameters"].update({key: value}))


@dataclass(frozen=True)
class Case:
    id: str
    base: str                              # hf, sharded, native, dist, mcore (PP=2) or rope (Llama 3.2)
    mutate: Callable[[Path], None]
    fragments: tuple[str, ...]             # each must appear in the one error line
    command: tuple[str, ...] = TO_NATIVE
    extra: tuple[str, ...] = ()


ST = "model.safetensors"
CASES = [
    # safetensors headers
    Case("header-is-a-list", "hf", edit_header(lambda h: [1, 2]), (ST, "a JSON list, not an object")),
    Case("header-is-a-number", "hf", edit_header(lambda h: 7), (ST, "a JSON int, not an object")),
    Case("header-is-a-string", "hf", edit_header(lambda h: "x"), (ST, "a JSON str, not an object")),
    Case("float-offsets", "hf", edit_entry(WPE, data_offsets=[0.0, 16384.0]), (ST, WPE, "not two non-negative integers")),
    Case("negative-offset", "hf", edit_entry(WPE, data_offsets=[-8, 16376]), (ST, WPE, "not two non-negative integers")),
    Case("bool-offsets", "hf", edit_entry(WPE, data_offsets=[False, True]), (ST, WPE, "not two non-negative integers")),
    Case("three-offsets", "hf", edit_entry(WPE, data_offsets=[0, 8, 16]), (ST, WPE, "not two non-negative integers")),
    Case("offsets-not-a-list", "hf", edit_entry(WPE, data_offsets="0-16"), (ST, WPE, "not two non-negative integers")),
    Case("begin-after-end", "hf", edit_header(lambda h: h[WPE].update(data_offsets=h[WPE]["data_offsets"][::-1])),
         (ST, WPE, "begin after they end")),
    Case("overlapping-ranges", "hf", edit_header(overlap), (ST, "overlaps the tensor before it")),
    Case("gap-in-data", "hf", edit_header(drop_entry), (ST, "leaves a gap")),
    Case("trailing-bytes", "hf", lambda f: (f / ST).write_bytes((f / ST).read_bytes() + b"\0" * 8),
         (ST, "8 bytes after the last tensor")),
    Case("duplicate-key", "hf", lambda f: write_raw(f / ST, None, read_raw(f / ST)[1], text=json.dumps(
        read_raw(f / ST)[0])[:-1] + f', "{WPE}": ' + json.dumps(read_raw(f / ST)[0][WPE]) + "}"),
         (ST, WPE, "listed twice")),
    Case("unknown-dtype", "hf", edit_entry(WPE, dtype="F7"), (ST, WPE, "unknown dtype 'F7'")),
    Case("negative-dim", "hf", edit_entry(WPE, shape=[-64, -64]), (ST, WPE, "not a list of non-negative integers")),
    Case("shape-as-string", "hf", edit_entry(WPE, shape="64x64"), (ST, WPE, "not a list of non-negative integers")),
    Case("float-dim", "hf", edit_entry(WPE, shape=[64.0, 64]), (ST, WPE, "not a list of non-negative integers")),
    Case("entry-missing-offsets", "hf", edit_header(lambda h: h[WPE].pop("data_offsets") and None),
         (ST, WPE, "exactly dtype")),
    Case("entry-extra-key", "hf", edit_entry(WPE, strides=[1]), (ST, WPE, "exactly dtype")),
    Case("entry-is-a-list", "hf", edit_header(lambda h: h.update({WPE: [1]})), (ST, WPE, "exactly dtype")),
    Case("size-not-shape", "hf", edit_entry(WPE, shape=[32, 64]), (ST, WPE, "its shape needs 8192")),
    Case("header-longer-than-file", "hf", lambda f: (f / ST).write_bytes(struct.pack("<Q", 10**6) + b"{}"),
         (ST, "corrupt safetensors header (length 1000000")),
    Case("shorter-than-8-bytes", "hf", write_bytes(ST, b"\x01\x02"), (ST, "shorter than its 8-byte header length")),
    Case("header-not-utf8", "hf", write_bytes(ST, struct.pack("<Q", 4) + b"\xff\xfe{}"), (ST, "corrupt safetensors header")),
    Case("header-not-json", "hf", write_bytes(ST, struct.pack("<Q", 6) + b"{nope}"), (ST, "corrupt safetensors header")),
    Case("metadata-not-strings", "hf", edit_header(lambda h: h.update(__metadata__={"format": 1})),
         (ST, "__metadata__ must map strings to strings")),
    Case("truncated-data", "hf", truncate(ST, 0.9), (ST, "truncated: tensor")),
    Case("weights-are-a-dir", "hf", replace_with_dir(ST), (ST, "not a regular file")),
    Case("weights-are-a-fifo", "hf", replace_with_fifo(ST), (ST, "not a regular file")),
    Case("weights-link-outside", "hf", symlink_outside(ST), (ST, "leads outside the checkpoint folder")),
    # sharded folders
    Case("key-in-two-shards", "sharded", key_in_two_shards, (S2, "is also stored in", S1)),
    Case("weight-map-wrong-shard", "sharded", wrong_shard, (S1, "is stored here but", f"maps it to {S2}")),
    Case("weight-map-omits-tensor", "sharded", unlisted_tensor, (S1, "does not list it")),
    Case("weight-map-lists-absent", "sharded", listed_but_absent, (S1, "transformer.h.0.ghost.weight", "is missing")),
    Case("shard-dotdot-escape", "sharded", shard_outside, (INDEX, "../evil.safetensors", "leads outside")),
    Case("shard-absolute-path", "sharded", shard_absolute, (INDEX, "evil.safetensors", "leads outside")),
    Case("shard-link-outside", "sharded", symlink_outside(S2), (S2, "leads outside")),
    Case("shard-is-a-dir", "sharded", replace_with_dir(S2), (S2, "not a regular file")),
    Case("shard-is-a-fifo", "sharded", replace_with_fifo(S2), (S2, "not a regular file")),
    Case("shard-missing", "sharded", lambda f: (f / S2).unlink(), (INDEX, f"lists shard {S2}, which is missing")),
    Case("index-is-a-list", "sharded", write_bytes(INDEX, b"[]"), (INDEX, "expected a JSON object, got a list")),
    Case("weight-map-is-a-list", "sharded", edit_json(INDEX, lambda d: d.update(weight_map=[S1])), (INDEX, "weight_map")),
    Case("weight-map-numbers", "sharded", index_map(lambda m: m.update(dict.fromkeys(m, 1))), (INDEX, "weight_map")),
    Case("index-not-json", "sharded", write_bytes(INDEX, b"{weight_map"), (INDEX, "cannot read JSON")),
    Case("index-not-utf8", "sharded", write_bytes(INDEX, b'{"weight_map": "\xff"}'), (INDEX, "cannot read JSON")),
    Case("shard-header-size", "sharded", edit_header(lambda h: h[sorted(k for k in h if k != "__metadata__")[1]]
                                                     .update(data_offsets=[0, 4]), S1), (S1, "holds 4 bytes")),
    # config.json
    Case("config-is-a-list", "hf", write_bytes("config.json", b"[1, 2]"), ("config.json", "expected a JSON object, got a list")),
    Case("config-is-a-number", "hf", write_bytes("config.json", b"42"), ("config.json", "expected a JSON object, got a int")),
    Case("config-is-a-dir", "hf", replace_with_dir("config.json"), ("config.json", "not a regular file")),
    Case("config-not-utf8", "hf", write_bytes("config.json", b'{"model_type": "\xff\xfe"}'), ("config.json", "cannot read JSON")),
    Case("config-not-json", "hf", write_bytes("config.json", b"{model_type: gpt2"), ("config.json", "cannot read JSON")),
    Case("vocab-size-string", "hf", config_field("vocab_size", "500"), ("config.json", "vocab_size must be an integer, got '500'")),
    Case("layers-float", "hf", config_field("n_layer", 2.5), ("config.json", "num_layers must be an integer, got 2.5")),
    Case("heads-zero", "hf", config_field("n_head", 0), ("config.json", "num_heads must be >= 1, got 0")),
    Case("hidden-negative", "hf", config_field("n_embd", -64), ("config.json", "hidden_size must be >= 1")),
    Case("positions-bool", "hf", config_field("n_positions", True), ("config.json", "max_position_embeddings must be an integer")),
    Case("eps-string", "hf", config_field("layer_norm_epsilon", "tiny"), ("config.json", "norm_eps must be a finite number")),
    Case("tie-not-bool", "hf", config_field("tie_word_embeddings", "yes"), ("config.json", "tie_word_embeddings must be true or false")),
    Case("eos-not-ids", "hf", config_field("eos_token_id", [1, "a"]), ("config.json", "eos_token_id must be a token id")),
    Case("bos-negative", "hf", config_field("bos_token_id", -3), ("config.json", "bos_token_id must be >= 0")),
    # files carried along
    Case("tokenizer-link-outside", "hf", symlink_outside("generation_config.json"), ("generation_config.json", "leads outside")),
    Case("tokenizer-is-a-dir", "hf", lambda f: (f / "tokenizer.json").mkdir(), ("tokenizer.json", "not a regular file")),
    # native folders
    Case("native-config-not-object", "native", edit_json("config.json", lambda d: d.update(config=[1])),
         ("config.json", '"config" must be a JSON object'), ("convert", "native-to-hf")),
    Case("native-heads-string", "native", native_config(lambda c: c.update(num_heads="4")),
         ("config.json", "num_heads must be an integer, got '4'"), ("convert", "native-to-hf")),
    Case("native-vocab-float", "native", native_config(lambda c: c.update(vocab_size=100.0)),
         ("config.json", "vocab_size must be an integer"), ("convert", "native-to-hf")),
    # weights that are not numbers
    Case("nan-strict", "hf", tensors(poke(WPE, float("nan"))), (ST, WPE, "1 NaN/Inf value(s)", "--strict"),
         extra=("--strict",)),
    Case("inf-strict", "hf", tensors(poke(QKV1, float("-inf"))), (ST, QKV1, "NaN/Inf"), extra=("--strict",)),
    # pickles and torch_dist
    Case("bin-payload", "hf", bin_payload, ("pytorch_model.bin", "refused an unsafe pickle")),
    Case("dist-metadata-system-payload", "dist", metadata_payload(Payload), (".metadata", "refused an unsafe pickle", "system"),
         ("convert", "megatron-to-hf")),
    Case("dist-metadata-eval-payload", "dist", metadata_payload(EvalPayload), (".metadata", "refused an unsafe pickle", "eval"),
         ("convert", "megatron-to-hf")),
    Case("dist-payload-in-valid-metadata", "dist", payload_inside_valid_metadata, (".metadata", "refused an unsafe pickle"),
         ("convert", "megatron-to-hf")),
    Case("dist-metadata-payload-inspect", "dist", metadata_payload(Payload), (".metadata", "refused an unsafe pickle"),
         ("inspect",)),
    Case("dist-metadata-empty", "dist", write_bytes("release/.metadata", b""), (".metadata", "corrupt or truncated"),
         ("convert", "megatron-to-hf")),
    Case("dist-metadata-truncated", "dist", truncate("release/.metadata", 0.5), (".metadata", "corrupt or truncated"),
         ("convert", "megatron-to-hf")),
    Case("dist-metadata-wrong-type", "dist", lambda f: dump_metadata(f, [1, 2]), (".metadata", "not torch_dist metadata"),
         ("convert", "megatron-to-hf")),
    Case("dist-data-path-escape", "dist", metadata_escape, (".metadata", "points outside the checkpoint folder"),
         ("convert", "megatron-to-hf")),
    Case("dist-distcp-truncated", "dist", truncate_distcp, (".distcp", "truncated: tensor"), ("convert", "megatron-to-hf")),
    # files a Megatron checkpoint names follow the safetensors rule: no symlink out of the checkpoint
    Case("dist-distcp-link-outside", "dist", lambda f: symlink_outside(f"release/{distcp_name(f)}")(f),
         (".distcp", "leads outside the checkpoint folder"), ("convert", "megatron-to-hf")),
    Case("dist-common-link-outside", "dist", symlink_outside("release/common.pt"),
         ("common.pt", "leads outside the checkpoint folder"), ("convert", "megatron-to-hf")),
    Case("dist-metadata-link-outside", "dist", symlink_outside("release/.metadata"),
         (".metadata", "leads outside the checkpoint folder"), ("inspect",)),
    Case("dist-release-link-outside", "dist", symlink_outside("release"),
         ("release", "leads outside the checkpoint folder"), ("convert", "megatron-to-hf")),
    Case("torch-rank-file-link-outside", "mcore", symlink_outside("release/mp_rank_00_001/model_optim_rng.pt"),
         ("mp_rank_00_001/model_optim_rng.pt", "leads outside the checkpoint folder"), ("convert", "megatron-to-hf")),
    Case("torch-rank-dir-link-outside", "mcore", symlink_outside("release/mp_rank_00_000"),
         ("mp_rank_00_000", "leads outside the checkpoint folder"), ("convert", "megatron-to-hf")),
    Case("weights-symlink-loop", "hf", lambda f: ((f / ST).unlink(), (f / ST).symlink_to(ST)),
         (ST, "cannot resolve the path")),
    Case("dist-chunk-missing", "dist", drop_chunk, (".metadata", "embedding.word_embeddings.weight",
                                                    "has no storage record"), ("convert", "megatron-to-hf")),
    Case("dist-records-replaced", "dist", zero_records, ("release: cannot read tensor", "UnpicklingError"),
         ("convert", "megatron-to-hf")),
    # weights in a dtype no plain checkpoint uses (float8 needs its scales and a quantization_config)
    Case("float8-in-fp32", "hf", tensors(lambda s: s.update({WPE: s[WPE].to(torch.float8_e4m3fn)})),
         (ST, WPE, "stored as float8_e4m3fn", "quantization_config")),
    Case("float8-e5m2-sharded", "sharded", cast_stored(QKV1, torch.float8_e5m2), (QKV1, "stored as float8_e5m2")),
    Case("int-weights", "hf", tensors(lambda s: s.update({WPE: s[WPE].to(torch.int16)})), (ST, WPE, "stored as int16")),
    Case("float8-native", "native", tensors(lambda s: s.update({"embed.weight": s["embed.weight"].to(torch.float8_e4m3fn)})),
         (ST, "embed.weight", "float8_e4m3fn"), ("convert", "native-to-hf")),
    # numbers out of range in rope_scaling (a Llama 3.2 config: transformers 5 saves it as rope_parameters)
    Case("rope-factor-nan", "rope", rope_field("factor", float("nan")),
         ("config.json", "rope_scaling.factor must be a finite number, got nan")),
    Case("rope-factor-negative", "rope", rope_field("factor", -4.0), ("config.json", "rope_scaling.factor must be > 0")),
    Case("rope-factor-inf", "rope", rope_field("factor", float("inf")), ("config.json", "rope_scaling.factor")),
    Case("rope-original-len-float", "rope", rope_field("original_max_position_embeddings", 32.5),
         ("config.json", "original_max_position_embeddings must be an integer")),
    Case("rope-llama3-high-equals-low", "rope", rope_field("high_freq_factor", 1.0),
         ("config.json", "high_freq_factor=1.0 must be above low_freq_factor=1.0")),
    Case("rope-factor-string", "rope", rope_field("factor", "8"), ("config.json", "rope_scaling.factor must be a finite")),
]


@pytest.fixture(scope="session")
def bases(gpt2_hf, tmp_path_factory) -> dict[str, Path]:
    from rosetool.converters import api
    root = tmp_path_factory.mktemp("hostile-bases")
    sharded = root / "sharded"
    shutil.copytree(gpt2_hf, sharded)
    shard(sharded)
    api.convert(gpt2_hf, root / "native", "native")
    _torch_dist(gpt2_hf, root / "dist")
    rope = build_hf(FAMILY["llama32"][0], root / "rope", **FAMILY["llama32"][1])
    from rosetool.cli.app import main
    with pytest.raises(SystemExit) as exc:   # Megatron torch format, two pipeline stages: mp_rank_00_00{0,1}
        main(["convert", "hf-to-megatron", str(gpt2_hf), str(root / "mcore"), "--pp", "2"])
    assert exc.value.code == 0
    return {"hf": gpt2_hf, "sharded": sharded, "native": root / "native", "dist": root / "dist", "rope": rope,
            "mcore": root / "mcore"}


def _torch_dist(src: Path, dst: Path) -> None:
    from rosetool.cli.app import main
    with pytest.raises(SystemExit) as exc:
        main(["convert", "hf-to-megatron", str(src), str(dst), "--format", "torch_dist"])
    assert exc.value.code == 0


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed): file digests, link targets, kinds."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if p.is_dir() else "special"
    return out


def one_error_line(res) -> str:
    assert "Traceback" not in res.err + res.out
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_fails_closed(case: Case, bases, tmp_path, cli, monkeypatch):
    src = tmp_path / "case" / "src"
    shutil.copytree(bases[case.base], src, symlinks=True)
    case.mutate(src)
    before = snapshot(tmp_path / "case")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    monkeypatch.chdir(tmp_path)
    argv = (*case.command, src) if case.command == ("inspect",) else (*case.command, src, out_parent / "dst", *case.extra)
    res = cli(*argv)
    assert res.code == 2, (res.out, res.err)
    line = one_error_line(res)
    for fragment in case.fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(tmp_path / "case") == before
    assert list(out_parent.iterdir()) == []
    assert not (tmp_path / "case" / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_nan_without_strict_warns_once_per_tensor_and_converts(bases, tmp_path, cli):
    src = tmp_path / "src"
    shutil.copytree(bases["hf"], src)
    tensors(lambda s: (poke(WPE, float("nan"))(s), poke(QKV0, float("inf"))(s)))(src)
    res = cli(*TO_NATIVE, src, tmp_path / "dst")
    assert res.code == 0, res.err
    warnings_ = [line for line in res.err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 2 and any(WPE in w for w in warnings_) and any(QKV0 in w for w in warnings_)
    assert "UserWarning" not in res.err and "Traceback" not in res.err


# ---- the command line itself: every bad argument is a usage message or one line, exit 2, never a traceback

SWEEP = [
    (), ("convert",), ("convert", "hf-to-native"), ("convert", "hf-to-native", "SRC"), ("convert", "--bogus"),
    ("nosuch",), ("convert", "nosuch"), ("convert", "hf-to-native", "SRC", "DST", "--dtype", "float7"),
    ("convert", "hf-to-native", "SRC", "DST", "--max-shard-size", "lots"),
    ("convert", "hf-to-native", "SRC", "DST", "--max-shard-size"),
    ("convert", "hf-to-megatron", "SRC", "DST", "--tp", "0"), ("convert", "hf-to-megatron", "SRC", "DST", "--tp", "x"),
    ("convert", "hf-to-megatron", "SRC", "DST", "--format", "zip"), ("reshard", "SRC", "DST", "--pp", "-1"),
    ("inspect",), ("inspect", "/no/such/folder"), ("inspect", "SRC", "--bogus"), ("verify",), ("verify", "SRC"),
    ("generate",), ("generate", "SRC", "1 2", "--device", "tpu"), ("generate", "SRC", "1 2", "--max-tokens", "x"),
    ("generate", "SRC", "1 2", "--dtype", "int3"), ("mappings", "show", "nosuch"), ("mappings", "--nope"),
    ("export-hf", "SRC"), ("demo", "--nope"),
    ("bench", "offline", "--backend", "openai", "--base-url", "http://127.0.0.1:99999"),
    ("bench", "offline", "--backend", "openai", "--base-url", "http://127.0.0.1:port"),
    ("bench", "offline", "--backend", "nosuch"), ("bench", "offline", "--num-prompts", "many"),
    ("bench", "online", "--request-rate", "fast"),
]


@pytest.mark.parametrize("argv", SWEEP, ids=[" ".join(a) or "(none)" for a in SWEEP])
def test_cli_sweep_never_shows_a_traceback(argv, bases, tmp_path, cli):
    args = [str(bases["hf"]) if a == "SRC" else str(tmp_path / "dst") if a == "DST" else a for a in argv]
    res = cli(*args)
    assert res.code == 2, (argv, res.out, res.err)
    text = res.out + res.err
    assert "Traceback" not in text and "File \"" not in text, text
    error_lines = [line for line in res.err.splitlines() if line.startswith("Error")]
    assert len(error_lines) <= 1, res.err
    assert error_lines or "Usage:" in text, text   # a usage error, or no-args help (click's NoArgsIsHelp)


def test_console_script_usage_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from rosetool.cli.app import main; main()", "convert", "--bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr and "Traceback" not in proc.stderr


# ---- the destination: user files are never lost, runs do not race, nothing is left behind

def beside(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name != dst.name)


def finish_then(action: Callable[[Path], None], monkeypatch) -> None:
    """Run `action(dst)` after the output is written but before it is moved into place."""
    from rosetool.converters import api, outdir
    commit = outdir._commit

    def late(tmp: Path, dst: Path, *args) -> None:
        action(dst)
        commit(tmp, dst, *args)
    monkeypatch.setattr(outdir, "_commit", late)
    assert api.atomic_output is outdir.atomic_output


def test_files_put_in_dst_during_the_run_are_kept(bases, tmp_path, cli, monkeypatch):
    dst = tmp_path / "out" / "dst"

    def user_writes(d: Path) -> None:
        d.mkdir()
        (d / "mine.txt").write_text("keep me")
    finish_then(user_writes, monkeypatch)
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 2
    line = one_error_line(res)
    kept = dst.parent / f"dst.rosetool-finished-{os.getpid()}"
    assert f"{dst}: destination changed during the run" in line and str(kept) in line
    assert (dst / "mine.txt").read_text() == "keep me" and sorted(p.name for p in dst.iterdir()) == ["mine.txt"]
    assert (kept / "model.safetensors").is_file() and (kept / "config.json").is_file()
    assert beside(dst) == [kept.name]


def test_file_put_at_dst_during_the_run_is_kept(bases, tmp_path, cli, monkeypatch):
    dst = tmp_path / "out" / "dst"
    finish_then(lambda d: d.write_text("a file"), monkeypatch)
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 2 and "destination changed during the run" in one_error_line(res)
    assert dst.read_text() == "a file"


@pytest.mark.parametrize("start", ["absent", "empty", "full", "link"])
def test_force_keeps_what_appeared_during_the_run(bases, tmp_path, cli, monkeypatch, start):
    """--force replaces DST as it was when the run started; a file written there meanwhile is kept,
    and the finished output is left beside it, as without --force."""
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    if start in ("empty", "full"):
        dst.mkdir()
    if start == "full":
        (dst / "old.txt").write_text("replace me")
    if start == "link":
        (tmp_path / "elsewhere").mkdir()
        dst.symlink_to(tmp_path / "elsewhere")

    def user_writes(d: Path) -> None:
        if start == "link":
            d.unlink()
        d.mkdir(exist_ok=True)
        (d / "mine.txt").write_text("written during the run")
    finish_then(user_writes, monkeypatch)
    res = cli(*TO_NATIVE, bases["hf"], dst, "--force")
    assert res.code == 2 and "destination changed during the run" in one_error_line(res)
    assert (dst / "mine.txt").read_text() == "written during the run"
    kept = dst.parent / f"dst.rosetool-finished-{os.getpid()}"
    assert (kept / "model.safetensors").is_file() and beside(dst) == [kept.name]
    if start == "link":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_force_replaces_an_unchanged_dst(bases, tmp_path, cli):
    dst = tmp_path / "out" / "dst"
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "old.txt").write_text("replace me")
    res = cli(*TO_NATIVE, bases["hf"], dst, "--force")
    assert res.code == 0, res.err
    assert (dst / "model.safetensors").is_file() and not (dst / "sub").exists() and beside(dst) == []


def _symlink_dst(tmp_path: Path) -> tuple[Path, Path]:
    """A destination that is a symlink to a folder holding a user's work."""
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("years of work")
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    dst.symlink_to(target)
    return dst, target


def test_symlink_dst_is_refused_without_force(bases, tmp_path, cli):
    dst, target = _symlink_dst(tmp_path)
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 2 and "destination is a symlink" in one_error_line(res)
    assert dst.is_symlink() and (target / "thesis.txt").read_text() == "years of work"
    assert beside(dst) == []


def test_force_replaces_a_symlink_dst_not_its_target(bases, tmp_path, cli):
    dst, target = _symlink_dst(tmp_path)
    res = cli(*TO_NATIVE, bases["hf"], dst, "--force")
    assert res.code == 0, res.err
    assert not dst.is_symlink() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["thesis.txt"]
    assert beside(dst) == []


def test_a_second_run_to_the_same_dst_is_refused(bases, tmp_path, cli):
    from rosetool.converters.outdir import _lock
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    with _lock(dst):
        res = cli(*TO_NATIVE, bases["hf"], dst)
        assert res.code == 2 and "another rosetool run is writing this destination" in one_error_line(res)
        assert not dst.exists()
    assert beside(dst) == []
    assert cli(*TO_NATIVE, bases["hf"], dst).code == 0 and beside(dst) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_of_a_dead_run_is_removed_with_one_line(bases, tmp_path, cli):
    dst = tmp_path / "out" / "dst"
    stale = dst.parent / f".dst.rosetool-tmp-{dead_pid()}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"\0" * 1024)
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 0, res.err
    notes = [line for line in res.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("warning: removed") and stale.name in notes[0]
    assert beside(dst) == []


def test_temp_of_a_live_process_is_not_removed(bases, tmp_path, cli):
    dst = tmp_path / "out" / "dst"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = dst.parent / f".dst.rosetool-tmp-{live.pid}"
        other.mkdir(parents=True)
        assert cli(*TO_NATIVE, bases["hf"], dst).code == 0
        assert other.is_dir() and beside(dst) == [other.name]
    finally:
        live.kill()
        live.wait()


SIGNAL_RUN = """
import os, signal, sys
from pathlib import Path
from rosetool.converters.outdir import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"0" * 4096)
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
"""


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    dst = tmp_path / "out" / "dst"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_RUN, str(dst), "SIGTERM"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not dst.exists() and beside(dst) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(bases, tmp_path, cli):
    dst = tmp_path / "out" / "dst"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_RUN, str(dst), "SIGKILL"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9
    assert len(beside(dst)) == 2        # its temp folder and its lock file
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 0 and "warning: removed" in res.err
    assert beside(dst) == [] and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES", "EIO"])
def test_os_errors_while_writing_are_one_line(code, bases, tmp_path, cli, monkeypatch):
    import errno
    number = getattr(errno, code)

    def broken(*args, **kwargs):
        raise OSError(number, os.strerror(number))
    monkeypatch.setattr(os, "copy_file_range", broken)
    monkeypatch.setattr(os, "pwrite", broken)
    dst = tmp_path / "out" / "dst"
    res = cli(*TO_NATIVE, bases["hf"], dst)
    assert res.code == 2
    assert one_error_line(res) == f"Error: {os.strerror(number)}"
    assert not dst.exists() and beside(dst) == []


def test_unwritable_destination_folder_is_one_line(bases, tmp_path, cli, monkeypatch):
    import errno
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith("rosetool-lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    res = cli(*TO_NATIVE, bases["hf"], tmp_path / "out" / "dst")
    assert res.code == 2 and one_error_line(res).endswith(f"rosetool-lock: {os.strerror(errno.EROFS)}")


# ---- smaller holes

def test_generate_says_when_the_context_ends_it(bases, cli):
    res = cli("generate", bases["hf"], "1 2 3", "--max-tokens", "100", "--temperature", "0", "--device", "cpu")
    assert res.code == 0, res.err
    assert len(res.out.split()) == 61     # 64 positions: 3 prompt tokens + 61 generated
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert lines == ["note: stopped after 61 of --max-tokens 100 tokens: prompt and output filled the model's "
                     "context of 64 tokens"]


def test_library_warnings_do_not_reach_the_user(bases, tmp_path, cli, monkeypatch):
    import warnings
    from rosetool.converters import api
    real = api.execute

    def noisy(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated", UserWarning)   # as torch says from deep inside a load
        return real(*args, **kwargs)
    monkeypatch.setattr(api, "execute", noisy)
    res = cli(*TO_NATIVE, bases["hf"], tmp_path / "dst")
    assert res.code == 0 and "Warning" not in res.err and "TypedStorage" not in res.err, res.err
    res = cli("convert", "megatron-to-hf", bases["dist"], tmp_path / "dst2")
    lines = [line for line in res.err.splitlines() if line.strip()]
    # the only line allowed is rosetool's own note that the export carries no tokenizer
    assert res.code == 0 and all(line.startswith("warning:") and "no tokenizer files" in line for line in lines), res.err


# ---- numbers out of range: one line, exit 2, before anything loads

@pytest.mark.parametrize("flag,value", [("--seed", str(2**64)), ("--seed", "-1"), ("--temperature", "nan"),
                                        ("--top-p", "inf"), ("--top-k", str(2**70))])
def test_generate_numbers_out_of_range(bases, cli80, flag, value):
    res = cli80("generate", bases["hf"], "1 2 3", flag, value, "--device", "cpu")
    assert res.code == 2, (res.out, res.err)
    line = one_error_line(res)
    assert flag.removeprefix("--").replace("-", "_") in line, line


def test_sampling_params_refuse_what_torch_cannot_hold():
    from rosetool.errors import RosetoolError
    from rosetool.runtime import SamplingParams
    for bad in [dict(seed=2**64), dict(temperature=float("inf")), dict(top_k=2**63), dict(max_tokens=2**64),
                dict(stop_token_ids=[2**63]), dict(repetition_penalty=float("nan"))]:
        with pytest.raises(RosetoolError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_quantized_configs_are_left_to_their_scheme():
    """The dtype rule stands aside when the config declares a quantization scheme (checked elsewhere)."""
    from types import SimpleNamespace
    from rosetool.converters.weight_dtypes import check_weight_dtypes
    tensors_ = {"w": SimpleNamespace(dtype=torch.float8_e4m3fn, file=Path("model.safetensors"))}
    check_weight_dtypes(tensors_, ["w"], {"quantization_config": {"quant_method": "fp8"}}, "llama")
    with pytest.raises(Exception, match="'w' is stored as float8_e4m3fn"):
        check_weight_dtypes(tensors_, ["w"], {}, "llama")


def test_torch_dist_write_failure_is_one_line(bases, tmp_path, cli, monkeypatch):
    """dcp.save wraps a failure while producing a tensor (here a full disk) in a CheckpointException, a
    BaseException: it comes back as what it was, one line, exit 2, nothing left beside DST."""
    import errno
    from rosetool.converters.megatron import dist_writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(dist_writer, "_convert", full)
    dst = tmp_path / "out" / "dst"
    res = cli("convert", "hf-to-megatron", bases["hf"], dst, "--format", "torch_dist")
    assert res.code == 2 and one_error_line(res) == f"Error: {os.strerror(errno.ENOSPC)}"
    assert not dst.exists() and beside(dst) == []
