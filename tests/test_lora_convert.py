"""LoRA adapters between HF PEFT and Megatron-Bridge's layout (`--adapters-only`): round trips are
bit-identical, exports load in peft with the merged model's logits, the rank files cut A and B the
way Bridge's ParallelLinearAdapter does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_hf
from lora_models import ATTENTION, GPT2_TARGETS, LLAMA_TARGETS, adapter_tensors, load_hf, logits, make_adapter, \
    peft_merged
from moe_models import build_moe_hf

CASES = {   # name -> (base, LoraConfig kwargs, --tp, --pp)
    "llama": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"gate_proj": 2},
                            alpha_pattern={"o_proj": 3}), 2, 2),
    "llama_qv_rslora": ("llama", dict(r=2, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), 2, 1),
    "qwen3_moe_attn": ("qwen3_moe", dict(r=2, lora_alpha=4, target_modules=ATTENTION), 2, 1),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=6, target_modules=GPT2_TARGETS, fan_in_fan_out=True), 2, 2),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory, cli_module):
    kind, lora, tp, pp = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = build_moe_hf("qwen3_moe", root / "base") if kind == "qwen3_moe" else build_hf(kind, root / "base")
    adapter = make_adapter(base, root / "adapter", **lora)
    run = cli_module
    assert run("convert", "hf-to-megatron", base, root / "mbase", "--tp", tp, "--pp", pp).code == 0
    result = run("convert", "hf-to-megatron", base, root / "madapter", "--adapter", adapter, "--adapters-only",
                 "--tp", tp, "--pp", pp)
    assert result.code == 0, result.err
    result = run("convert", "megatron-to-hf", root / "mbase", root / "back", "--adapter", root / "madapter",
                 "--adapters-only")
    assert result.code == 0, result.err
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(5))
    return request.param, root, base, adapter, tokens, vocab


@pytest.fixture(scope="module")
def cli_module():
    """`rosetool ARGS` in process, for module-scoped fixtures (exit code and stderr)."""
    import contextlib
    import io
    from conftest import CliResult
    from rosetool.cli.app import main

    def run(*args) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code or 0
        return CliResult(code, out.getvalue(), err.getvalue())
    return run


def test_hf_megatron_hf_is_bit_identical(converted):
    name, root, base, adapter, tokens, vocab = converted
    before, after = adapter_tensors(adapter), adapter_tensors(root / "back")
    assert before.keys() == after.keys(), name
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert json.loads((root / "back" / "adapter_config.json").read_text()) == \
        json.loads((adapter / "adapter_config.json").read_text())


def test_megatron_adapter_merges_to_peft_logits(converted):
    """The Megatron adapter merged into the Megatron base (TP/PP shards, fused layers) or the HF one ==
    peft's merge of the HF adapter."""
    from rosetool.runtime.loader import load_model
    name, root, base, adapter, tokens, vocab = converted
    ref = logits(peft_merged(base, adapter), tokens)
    for target in (root / "mbase", base):     # a Megatron adapter merges into any copy of its base
        model, _ = load_model(target, torch.float32, adapters=[root / "madapter"])
        torch.testing.assert_close(logits(model, tokens)[..., :vocab], ref, atol=1e-5, rtol=0, msg=f"{name} {target}")


def test_export_loads_in_peft(converted):
    name, root, base, adapter, tokens, vocab = converted
    torch.testing.assert_close(logits(peft_merged(base, root / "back"), tokens),
                               logits(peft_merged(base, adapter), tokens), atol=0, rtol=0, msg=name)


def test_rank_files_follow_bridge_cuts(converted):
    """Each rank's merged weight, computed the way Megatron-Bridge's adapter runs on that rank, equals the
    rank's shard of the merged model: column-parallel bases (linear_qkv, linear_fc1) gather A's rank rows
    and keep their own B rows; row-parallel bases (linear_proj, linear_fc2) keep their A columns and
    gather B."""
    from rosetool.converters.megatron.unpickler import load_rank_file
    name, root, base, adapter, tokens, vocab = converted
    kind, lora, tp, pp = CASES[name]
    rank_dir = "mp_rank_{:02d}" + ("_000" if pp > 1 else "")
    bases = [load_rank_file(root / "mbase" / "release" / rank_dir.format(t) / "model_optim_rng.pt")["model"]
             for t in range(tp)]
    ads = [load_rank_file(root / "madapter" / "release" / rank_dir.format(t) / "model_optim_rng.pt")["model"]
           for t in range(tp)]
    record = json.loads((root / "madapter" / "rosetool_lora.json").read_text())
    mcore = root / "merged"
    from rosetool.adapters.merge import with_adapters
    from rosetool.converters.api import convert
    from rosetool.converters.megatron import Layout, make_writer
    from rosetool.converters.sources import open_checkpoint
    convert(with_adapters(open_checkpoint(base), [adapter]), mcore, "megatron", params={"tensor_parallel": tp},
            writer=make_writer(Layout(tp, pp)))
    merged = [load_rank_file(mcore / "release" / rank_dir.format(t) / "model_optim_rng.pt")["model"] for t in range(tp)]
    checked = 0
    for key in (k for k in ads[0] if k.endswith("adapter.linear_in.weight")):
        weight = key.replace("adapter.linear_in.weight", "weight")
        blocks = record["modules"][weight]     # stage 0: its local layer numbers are the global ones
        a_name, b_name = key, key.replace("linear_in", "linear_out")
        column = any(s in key for s in ("linear_qkv", "linear_fc1"))
        for t in range(tp):
            a = torch.cat([ads[r][a_name] for r in range(tp)]) if column else ads[t][a_name]
            b = ads[t][b_name] if column else torch.cat([ads[r][b_name] for r in range(tp)])
            delta, start = torch.zeros_like(bases[t][weight]), 0
            for block in blocks:   # Bridge scales by alpha / dim; rosetool's record gives each fused block its own
                n = block["rank"]
                scale = block["alpha"] / (block["r"] ** 0.5 if block["rslora"] else block["r"])
                delta += (b[:, start:start + n] @ a[start:start + n]) * scale
                start += n
            want = bases[t][weight] + delta
            torch.testing.assert_close(merged[t][weight], want, atol=1e-6, rtol=0, msg=f"{name} {weight} rank {t}")
            checked += 1
    assert checked >= 2 * tp   # every layer of stage 0 on every rank, at least


def test_megatron_trained_adapter_exports_with_shared_a(tmp_path, cli):
    """An adapter as Megatron trains it - one A for the fused linear_qkv and linear_fc1, scaled alpha / dim -
    exports to q/k/v (gate/up) modules sharing that A, and peft's merge of the export is rosetool's merge."""
    from rosetool.adapters.lora import FusedPair, Scale
    from rosetool.adapters.megatron_io import megatron_steps, write_megatron_adapter
    from rosetool.converters.megatron import Layout
    from rosetool.converters.sources import open_checkpoint
    from rosetool.runtime.loader import load_model
    base = build_hf("llama", tmp_path / "base")
    assert cli("convert", "hf-to-megatron", base, tmp_path / "mbase", "--tp", "2").code == 0
    mbase = open_checkpoint(tmp_path / "mbase")
    gen = torch.Generator().manual_seed(0)
    fused = {}
    for step in megatron_steps(mbase, "megatron", 2)[0]:
        if any(s in step.key for s in ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                        "linear_fc2.weight")):
            out, inp = step.shape
            fused[step.key] = FusedPair(torch.randn(4, inp, generator=gen) * 0.1,
                                        torch.randn(out, 4, generator=gen) * 0.1, [(4, Scale(8, 4))])
    (tmp_path / "mad").mkdir()
    write_megatron_adapter(tmp_path / "mad", mbase, fused, "megatron", Layout(2), None)
    result = cli("convert", "megatron-to-hf", tmp_path / "mbase", tmp_path / "peft", "--adapter", tmp_path / "mad",
                 "--adapters-only")
    assert result.code == 0, result.err
    exported = adapter_tensors(tmp_path / "peft")
    prefix = "base_model.model.model.layers.0."
    assert torch.equal(exported[prefix + "self_attn.q_proj.lora_A.weight"], exported[prefix + "self_attn.v_proj.lora_A.weight"])
    assert torch.equal(exported[prefix + "mlp.gate_proj.lora_A.weight"], exported[prefix + "mlp.up_proj.lora_A.weight"])
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    model, _ = load_model(tmp_path / "mbase", torch.float32, adapters=[tmp_path / "mad"])
    torch.testing.assert_close(logits(peft_merged(base, tmp_path / "peft"), tokens), logits(model, tokens)[..., :96],
                               atol=1e-5, rtol=0)


def test_adapters_only_refusals(tmp_path, cli):
    base = build_hf("llama", tmp_path / "base")
    saved = make_adapter(base, tmp_path / "saved", r=2, lora_alpha=4, target_modules=["q_proj"],
                         modules_to_save=["lm_head"])
    result = cli("convert", "hf-to-megatron", base, tmp_path / "out", "--adapter", saved, "--adapters-only")
    assert result.code == 2 and "modules_to_save" in result.err and len(result.err.strip().splitlines()) == 1
    odd = make_adapter(base, tmp_path / "odd", r=3, lora_alpha=4, target_modules=["q_proj"])
    result = cli("convert", "hf-to-megatron", base, tmp_path / "out", "--adapter", odd, "--adapters-only", "--tp", "2")
    assert result.code == 2 and "linear_qkv.adapter.linear_in" in result.err and "TP=2" in result.err
    result = cli("convert", "hf-to-megatron", base, tmp_path / "out", "--adapters-only")
    assert result.code == 2 and "exactly one --adapter" in result.err
    assert not (tmp_path / "out").exists()
