"""The runtime against HF `generate` (dynamic and static cache) on CPU, alternated in one run.

    python benchmarks/runtime_cpu.py --arch gpt2 --num-prompts 32      # GPT-2 12x768, 32 x 64 in / 64 out
    python benchmarks/runtime_cpu.py --arch llama --num-prompts 32     # Llama 12x768, 6 heads / 1 KV head
    python benchmarks/runtime_cpu.py --arch gpt2 --num-prompts 1       # one request

Random fp32 weights, greedy, ignore_eos. Each round runs `rosetool bench offline` once per backend, each
in a fresh process, in rotated order so load from other jobs on a shared machine falls on all three
alike; prints the median total tokens/s, its ratio to each HF baseline, and each backend's peak RSS.
All three get the same intra-op thread count (--threads, default the runtime's own choice, see
rosetool/runtime/host.py), so the ratio compares the code, not the thread pools.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rosetool.converters.synthetic import gpt2_config, llama_config, write_synthetic_hf
from rosetool.runtime.host import cpu_threads

CHILD = """
import sys
from rosetool.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
with open("/proc/self/status") as f:   # VmHWM is this process's own peak, not inherited across exec
    print("PEAK_RSS", int(next(l for l in f if l.startswith("VmHWM")).split()[1]) * 1024, file=sys.stderr)
"""
BACKENDS = {"rosetool": ["--backend", "rosetool"], "hf-dynamic": ["--backend", "hf"],
            "hf-static": ["--backend", "hf", "--hf-static-cache"]}


def model_folder(arch: str, workdir: Path) -> Path:
    folder = workdir / f"{arch}-12x768"
    if not (folder / "config.json").exists():
        cfg = gpt2_config(12, 768, vocab_size=50257) if arch == "gpt2" else llama_config(12, 768, vocab_size=32000)
        write_synthetic_hf(folder, cfg, dtype=torch.float32)
    return folder


def run(backend: str, model: Path, args: argparse.Namespace) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = ["bench", "offline", *BACKENDS[backend], "--model", str(model), "--device", "cpu", "--dtype", "float32",
               "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--ignore-eos", "--temperature", "0", "--warmup", "1",
               "--runs", "1", "--save-result", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ROSETOOL_NUM_THREADS": str(args.threads)}
        proc = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{backend} failed:\n{proc.stderr[-2000:]}")
        peak = int(next(l for l in proc.stderr.splitlines() if l.startswith("PEAK_RSS")).split()[1])
        return json.loads(out.read_text())["total_token_throughput"], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for all three")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rosetool-runtime-bench"))
    args = ap.parse_args()
    args.threads = args.threads or cpu_threads()
    model = model_folder(args.arch, args.workdir)
    names = list(BACKENDS)
    seen: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            seen[name].append(run(name, model, args))
            print(f"round {r + 1} {name}: {seen[name][-1][0]:.1f} tok/s", file=sys.stderr)
    tps = {n: statistics.median(t for t, _ in seen[n]) for n in names}
    peak = {n: max(p for _, p in seen[n]) for n in names}
    print(f"| {args.arch} 12x768, {args.threads} thread(s), {args.num_prompts} x {args.input_len} in / {args.output_len} out "
          f"| rosetool {tps['rosetool']:.0f} tok/s | HF dynamic {tps['hf-dynamic']:.0f} "
          f"({tps['rosetool'] / tps['hf-dynamic']:.2f}x) | HF static {tps['hf-static']:.0f} "
          f"({tps['rosetool'] / tps['hf-static']:.2f}x) | peak RSS rosetool {peak['rosetool'] / 2**20:,.0f} MiB, "
          f"HF dynamic {peak['hf-dynamic'] / 2**20:,.0f} MiB, HF static {peak['hf-static'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
