"""What the NaN/Inf scan costs a conversion, against a plain copy of the same bytes.

    python benchmarks/finite_scan_bench.py --layers 16 --width 1024 --workdir /tmp/rosetool-finite-bench

Writes a synthetic Llama HF checkpoint (fp16 noise), then in fresh processes, page cache hot, median of
--repeats after one warm-up: (1) copies its files, (2) runs only the scan `convert` does before writing
(`rosetool.converters.finite.check_finite` over every source tensor), (3) runs `convert(src, dst, "native")`,
scan included. The scan's share of the conversion is (2) / (3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rosetool.converters.synthetic import llama_config, write_synthetic_hf

CHILD = """
import shutil, sys, time
from pathlib import Path
kind, src, dst = sys.argv[1:4]
if kind == "copy":
    t = time.perf_counter()
    Path(dst).mkdir()
    for f in Path(src).iterdir():
        shutil.copyfile(f, Path(dst) / f.name)
elif kind == "scan":
    from rosetool.converters.finite import check_finite
    from rosetool.converters.sources import open_checkpoint
    t = time.perf_counter()
    ckpt = open_checkpoint(src)
    check_finite(ckpt, ckpt.tensors, strict=True)
else:
    from rosetool.converters.api import convert
    t = time.perf_counter()
    convert(src, dst, "native")
print(time.perf_counter() - t)
"""


def run(kind: str, src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(dst)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rosetool-finite-bench"))
    args = ap.parse_args()
    src = args.workdir / f"llama-{args.layers}x{args.width}"
    if not (src / "model.safetensors").exists():
        write_synthetic_hf(src, llama_config(args.layers, args.width, args.vocab), dtype=torch.float16)
    nbytes = (src / "model.safetensors").stat().st_size
    seconds = {}
    for kind in ("copy", "scan", "convert"):
        run(kind, src, args.workdir / "out")
        seconds[kind] = statistics.median(run(kind, src, args.workdir / "out") for _ in range(args.repeats))
    mbps = {k: nbytes / s / 1e6 for k, s in seconds.items()}
    print("| checkpoint | bytes | copy MB/s | scan alone MB/s | hf->native with scan MB/s (vs copy) | scan share |")
    print("|---|---|---|---|---|---|")
    print(f"| llama {args.layers} layers x {args.width} | {nbytes / 1e9:.2f} GB | {mbps['copy']:,.0f} "
          f"| {mbps['scan']:,.0f} | {mbps['convert']:,.0f} ({mbps['convert'] / mbps['copy']:.0%}) "
          f"| {seconds['scan'] / seconds['convert']:.0%} |")
    print(f"\n{time.strftime('%Y-%m-%d')}, {sys.platform}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
