"""Conversion commands leave without interpreter teardown once their output is written, and only as
the real `rosetool` process."""

import json
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from conftest import build_hf, hf_logits, runtime_logits


def test_console_conversion_skips_teardown_after_writing_everything(tmp_path):
    src = build_hf("gpt2", tmp_path / "hf", seed=11, n_layer=1, n_embd=24, n_head=3, vocab_size=53)
    script = textwrap.dedent("""
        import atexit, sys
        atexit.register(lambda: print("TEARDOWN", flush=True))
        sys.argv = ["rosetool", *sys.argv[1:]]
        from rosetool.cli.app import main
        main()
    """)
    run = subprocess.run([sys.executable, "-c", script, "convert", "hf-to-native", str(src), str(tmp_path / "n"),
                          "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "TEARDOWN" not in run.stdout
    assert json.loads(run.stdout)["num_tensors"] == len(load_file(tmp_path / "n" / "model.safetensors"))
    tokens = torch.tensor([[3, 7, 50, 1]])
    assert torch.allclose(hf_logits(src, tokens), runtime_logits(tmp_path / "n", tokens), atol=1e-5)


def test_console_script_conversion_output_is_complete(tmp_path):
    src = build_hf("llama", tmp_path / "hf", seed=12)
    exe = shutil.which("rosetool")
    assert exe is not None
    run = subprocess.run([exe, "export-hf", str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "hf -> hf" in run.stdout
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_in_process_callers_return_normally(tmp_path, cli):
    src = build_hf("gpt2", tmp_path / "hf", seed=13, n_layer=1, n_embd=16, n_head=2, vocab_size=40)
    res = cli("convert", "hf-to-native", src, tmp_path / "n")
    assert res.code == 0 and (tmp_path / "n" / "model.safetensors").exists()
