"""Start-up: the CLI module, `--help`, `-h`, `--version` and `mappings` never import torch."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "matplotlib", "numpy")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_importing_the_cli_imports_no_torch() -> None:
    proc = _run(["-X", "importtime", "-c", "import rosetool.cli.app"])
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "rosetool.cli.app" in imported
    assert not [m for m in imported if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--version"], ["convert", "hf-to-native", "--help"],
                                  ["export-hf", "-h"], ["bench", "--help"],
                                  ["mappings", "list"], ["mappings", "show", "llama"]])
def test_commands_that_read_no_tensors_run_with_torch_unimportable(argv: list[str]) -> None:
    blocked = "import sys\nfor m in %r: sys.modules[m] = None\n" % (HEAVY[:2],)
    proc = _run(["-c", f"{blocked}from rosetool.cli.app import main\nmain({argv!r})"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    if argv == ["--version"]:
        assert proc.stdout.startswith("rosetool ")
    if argv[:2] == ["mappings", "list"]:
        assert "llama" in proc.stdout and "gpt2" in proc.stdout


def test_inspect_reads_hf_and_native_headers_without_torch(gpt2_hf: Path, tmp_path: Path) -> None:
    from rosetool.converters.api import convert
    convert(gpt2_hf, tmp_path / "native", "native", dtype="bfloat16")
    blocked = "import sys\nfor m in %r: sys.modules[m] = None\n" % (HEAVY[:2],)
    for folder, fmt, dtype in ((gpt2_hf, "hf", "float32"), (tmp_path / "native", "native", "bfloat16")):
        argv = ["inspect", str(folder), "--json"]
        proc = _run(["-c", f"{blocked}from rosetool.cli.app import main\nmain({argv!r})"])
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["format"] == fmt and {t["dtype"] for t in doc["tensors"]} == {dtype}
        weights = sorted(folder.glob("*.safetensors"))
        assert doc["bytes"] == sum(f.stat().st_size - 8 - _header_len(f) for f in weights)


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]
