"""Megatron conversion throughput and peak memory, for two model depths.

    python benchmarks/megatron_convert.py --layers 8,32 --hidden 1024 --workdir /tmp/rosetool-mbench

For each depth: writes a synthetic HF Llama checkpoint (fp16 noise), then in fresh processes runs
`convert hf-to-megatron --tp 2 --pp 2`, `convert megatron-to-hf`, `reshard --tp 1 --pp 1` and
`convert hf-to-megatron --format torch_dist`, and
reports wall time (conversion only) and peak RSS (VmHWM). Peak memory should track the largest rank
file plus one global tensor, not the model size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rosetool.converters.synthetic import llama_config, write_synthetic_hf

CHILD = """
import sys, time
from rosetool.cli.app import main
t = time.perf_counter()
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(time.perf_counter() - t, int(peak.split()[1]) * 1024)
"""


def run(*argv: object) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], check=True, capture_output=True, text=True)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), int(peak)


def largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench(layers: int, hidden: int, work: Path) -> list[dict]:
    hf, mg, back, merged, dist = (work / f"{name}-{layers}" for name in ("hf", "mg", "back", "merged", "dist"))
    for p in (hf, mg, back, merged, dist):
        shutil.rmtree(p, ignore_errors=True)
    nbytes = write_synthetic_hf(hf, llama_config(layers, hidden, vocab_size=32000))
    rows = []
    for name, argv, out in [("hf-to-megatron tp2 pp2", ("convert", "hf-to-megatron", hf, mg, "--tp", 2, "--pp", 2), mg),
                            ("megatron-to-hf", ("convert", "megatron-to-hf", mg, back), back),
                            ("reshard tp1 pp1", ("reshard", mg, merged), merged),
                            ("hf-to-megatron torch_dist", ("convert", "hf-to-megatron", hf, dist, "--format",
                                                           "torch_dist"), dist)]:
        seconds, peak = run(*argv)
        rows.append({"layers": layers, "model_mb": nbytes / 1e6, "step": name, "seconds": round(seconds, 2),
                     "mb_per_s": round(nbytes / seconds / 1e6), "peak_rss_mb": round(peak / 1e6),
                     "largest_output_file_mb": round(largest_file(out) / 1e6)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rosetool-mbench"))
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    baseline = run("--help")[1]
    print(json.dumps({"interpreter_baseline_rss_mb": round(baseline / 1e6)}))
    for layers in map(int, a.layers.split(",")):
        for row in bench(layers, a.hidden, a.workdir):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
