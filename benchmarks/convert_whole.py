"""Whole `rosetool` commands against `cp -r` of the same bytes, alternated in one run.

    python benchmarks/convert_whole.py --case llama-hf-to-native     # Llama-shaped 1.7 GB bf16
    python benchmarks/convert_whole.py --case llama-native-to-hf
    python benchmarks/convert_whole.py --case gpt2-hf-to-native      # GPT-2-shaped 1.8 GB fp16 (Conv1D transposes)
    python benchmarks/convert_whole.py --case gpt2-export-hf         # HF -> HF, nothing to change
    python benchmarks/convert_whole.py --case llama-hf-to-megatron-tp2
    python benchmarks/convert_whole.py --case llama-fp8-to-bf16     # 1.6 GB FP8 (128x128 blocks) -> 2.9 GB bf16

Each round runs `cp -r SRC` and the rosetool command, each a fresh process timed from spawn to exit
(interpreter start-up, imports and teardown included: what a user waits for), in alternating order,
after `sync` so no run inherits another's dirty pages. Prints medians, rosetool's speed as a share of
cp's, and rosetool's peak RSS (from wait4) beside the 1 GiB + 2x largest tensor bound. Dequantizing
writes twice the bytes it reads, so its `cp` copies the bf16 model (the same bytes as its output).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from rosetool.converters.synthetic import gpt2_config, llama_config, write_synthetic_hf

CASES = {   # name -> (model, rosetool arguments before SRC DST, which conversion of the model is the source)
    "llama-hf-to-native": ("llama", ["convert", "hf-to-native"], "hf"),
    "llama-native-to-hf": ("llama", ["convert", "native-to-hf"], "native"),
    "gpt2-hf-to-native": ("gpt2", ["convert", "hf-to-native"], "hf"),
    "gpt2-export-hf": ("gpt2", ["export-hf"], "hf"),
    "llama-hf-to-megatron-tp2": ("llama", ["convert", "hf-to-megatron", "--tp", "2"], "hf"),
    "llama-fp8-to-bf16": ("llama28", ["export-hf", "--dtype", "bfloat16"], "fp8"),
}
PREPARE = {"native": ["convert", "hf-to-native"], "fp8": ["export-hf", "--quantize", "fp8"]}


def source(model: str, workdir: Path) -> tuple[Path, int]:
    """Llama 16 x 2048 (vocab 32000) in bf16, or GPT-2 44 x 1280 (vocab 50257) in fp16; largest tensor."""
    folder = workdir / model
    if model.startswith("llama"):
        layers = int(model.removeprefix("llama") or 16)
        cfg, dtype, largest = llama_config(layers, 2048, vocab_size=32000), torch.bfloat16, 32000 * 2048 * 2
    else:
        cfg, dtype, largest = gpt2_config(44, 1280, vocab_size=50257), torch.float16, 50257 * 1280 * 2
    if not (folder / "config.json").exists():
        write_synthetic_hf(folder, cfg, dtype=dtype)
    return folder, largest


def timed(cmd: list[str], workdir: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS, through /usr/bin/time: a child forked straight from this process would
    report this process's RSS (torch, the synthetic model) as its own peak."""
    os.sync()
    rss = workdir / "rss.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds, int(rss.read_text().split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rosetool-convert-whole"))
    args = ap.parse_args()
    model, command, kind = CASES[args.case]
    src, largest = source(model, args.workdir)
    baseline = src if kind == "fp8" else None     # the output's bytes: the bf16 model
    if kind in PREPARE:
        prepared = args.workdir / f"{model}-{kind}"
        if not (prepared / "config.json").exists():
            subprocess.run(["rosetool", *PREPARE[kind], str(src), str(prepared)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        src = prepared
    baseline = baseline or src
    nbytes = sum(f.stat().st_size for f in baseline.iterdir())
    out = args.workdir / "out"
    runs = {"cp": ["cp", "-r", str(baseline), str(out)], "rosetool": ["rosetool", *command, str(src), str(out)]}
    seen: dict[str, list[tuple[float, int]]] = {"cp": [], "rosetool": []}
    for r in range(args.rounds + 1):   # round 0 warms the page cache and is not counted
        for name in (["cp", "rosetool"] if r % 2 else ["rosetool", "cp"]):
            shutil.rmtree(out, ignore_errors=True)
            result = timed(runs[name], args.workdir)
            if r:
                seen[name].append(result)
    shutil.rmtree(out, ignore_errors=True)
    cp_s = statistics.median(s for s, _ in seen["cp"])
    ro_s = statistics.median(s for s, _ in seen["rosetool"])
    peak = max(p for _, p in seen["rosetool"])
    bound = (1 << 30) + 2 * largest
    print(f"| {args.case}, {nbytes / 1e9:.2f} GB | cp {cp_s:.2f} s ({nbytes / cp_s / 1e6:,.0f} MB/s) "
          f"| rosetool {ro_s:.2f} s ({nbytes / ro_s / 1e6:,.0f} MB/s) | {cp_s / ro_s:.0%} of cp "
          f"| peak RSS {peak / 2**20:,.0f} MiB (bound {bound / 2**20:,.0f} MiB) |")


if __name__ == "__main__":
    main()
