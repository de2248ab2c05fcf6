"""Conversion throughput and peak memory against a plain copy of the same bytes.

    python benchmarks/convert_bench.py --arch llama --layers 16,64 --width 1024 --workdir /tmp/rosetool-bench

For each size: writes a synthetic HF checkpoint (fp16 noise; GPT-2 or Llama shapes), then in fresh processes
(1) copies its files with shutil.copyfile, (2) runs `rosetool convert hf-to-native`, (3) runs
`rosetool convert native-to-hf`. Each is run --repeats times after one warm-up (page cache hot for
all three, so the comparison is fair); the median is reported with peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rosetool.converters.synthetic import gpt2_config, llama_config, mixtral_config, write_synthetic_hf

CHILD = """
import shutil, sys, time
from pathlib import Path
kind, src, dst = sys.argv[1:4]
t = time.perf_counter()
if kind == "copy":
    Path(dst).mkdir()
    for f in Path(src).iterdir():
        shutil.copyfile(f, Path(dst) / f.name)
else:
    from rosetool.converters.api import convert
    t = time.perf_counter()   # conversion time without interpreter start-up and imports
    convert(src, dst, kind)
peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))   # not inherited across exec
print(time.perf_counter() - t, int(peak.split()[1]) * 1024)
"""


def run(kind: str, src: Path, dst: Path) -> tuple[float, int]:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()   # start each run with no dirty pages, or writeback throttling lands on whoever runs next
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(dst)], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def measure(kind: str, src: Path, dst: Path, repeats: int) -> dict:
    run(kind, src, dst)
    runs = [run(kind, src, dst) for _ in range(repeats)]
    return {"seconds": statistics.median(r[0] for r in runs), "peak_rss": max(r[1] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gpt2", "llama", "mixtral"], default="llama")
    ap.add_argument("--layers", default="16,64", help="comma-separated layer counts (one checkpoint each)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rosetool-convert-bench"))
    args = ap.parse_args()
    results = []
    for layers in map(int, args.layers.split(",")):
        src = args.workdir / f"{args.arch}-{layers}x{args.width}"
        make = {"gpt2": gpt2_config, "llama": llama_config, "mixtral": mixtral_config}[args.arch]
        if not (src / "model.safetensors").exists():
            write_synthetic_hf(src, make(layers, args.width, args.vocab), dtype=torch.float16)
        nbytes = (src / "model.safetensors").stat().st_size
        largest = max(args.vocab, 4 * args.width) * args.width * 2   # Mixtral experts (3.5x wide) fit under it
        row = {"layers": layers, "bytes": nbytes, "largest_tensor": largest}
        row["copy"] = measure("copy", src, args.workdir / "copy", args.repeats)
        row["hf-to-native"] = measure("native", src, args.workdir / "native", args.repeats)
        row["native-to-hf"] = measure("hf", args.workdir / "native", args.workdir / "back", args.repeats)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    print("| checkpoint | bytes | largest tensor | copy MB/s | hf->native MB/s (vs copy) | native->hf MB/s (vs copy) "
          "| peak RSS hf->native | bound 1 GiB + 2x largest |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        mbps = {k: r["bytes"] / r[k]["seconds"] / 1e6 for k in ("copy", "hf-to-native", "native-to-hf")}
        bound = (1 << 30) + 2 * r["largest_tensor"]
        print(f"| {args.arch} {r['layers']} layers x {args.width} | {r['bytes'] / 1e9:.2f} GB | {r['largest_tensor'] / 1e6:.0f} MB "
              f"| {mbps['copy']:,.0f} | {mbps['hf-to-native']:,.0f} ({mbps['hf-to-native'] / mbps['copy']:.0%}) "
              f"| {mbps['native-to-hf']:,.0f} ({mbps['native-to-hf'] / mbps['copy']:.0%}) "
              f"| {r['hf-to-native']['peak_rss'] / 2**20:,.0f} MiB | {bound / 2**20:,.0f} MiB |")
    print(f"\n{time.strftime('%Y-%m-%d')}, {sys.platform}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
