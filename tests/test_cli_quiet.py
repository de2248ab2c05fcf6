"""transformers' loading bars and torch's UserWarnings stay out of rosetool's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import build_hf

ROOT = Path(__file__).resolve().parents[1]


def _rosetool(*args: object, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                           "ROSETOOL_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **({"ROSETOOL_DEBUG": "1"} if debug else {}))
    code = f"from rosetool.cli.app import main; main({[str(a) for a in args]!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_hf_backend_bench_prints_no_loading_bar(tmp_path: Path) -> None:
    hf = build_hf("gpt2", tmp_path / "hf")
    args = ("bench", "offline", "--backend", "hf", "--model", hf, "--num-prompts", 2, "--input-len", 4,
            "--output-len", 2, "--warmup", 0, "--runs", 1)
    loud = _rosetool(*args, debug=True)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr   # what the user would otherwise see
    quiet = _rosetool(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "Warning" not in quiet.stderr
    assert "offline" in quiet.stdout
