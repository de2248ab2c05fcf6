#!/usr/bin/env bash
# Tensor parallelism on one machine: the same workload at TP=1 and TP=2 (gloo, local processes), in one run.
# Llama shapes (8 x 768, 6 heads / 1 KV head, intermediate 2048, vocabulary 32000; random fp32 weights),
# greedy, ignore_eos, 128 prompt + 64 new tokens per request. On CPU the ranks split the machine's cores
# (torch threads per rank = cores / N), so TP=2 measures the cost of sharding, not extra hardware.
#
#   benchmarks/tp_cpu.sh OUT_DIR [NUM_PROMPTS] [DEVICE] [DTYPE]
set -euo pipefail
OUT=${1:?output folder}; N=${2:-16}; DEVICE=${3:-cpu}; DTYPE=${4:-float32}
mkdir -p "$OUT"
MODEL="$OUT/llama-8x768-random"
[ -f "$MODEL/config.json" ] || python -c "
from pathlib import Path; import torch
from rosetool.converters.synthetic import llama_config, write_synthetic_hf
write_synthetic_hf(Path('$MODEL'), llama_config(8, 768, vocab_size=32000), dtype=torch.float32)"
COMMON=(--backend rosetool --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --num-prompts "$N" --input-len 128
        --output-len 64 --ignore-eos --temperature 0 --warmup 1 --runs 3)
rosetool bench offline "${COMMON[@]}" --tp 1 --save-result "$OUT/tp1-$N.json"
rosetool bench offline "${COMMON[@]}" --tp 2 --save-result "$OUT/tp2-$N.json"
rosetool bench compare "$OUT/tp1-$N.json" "$OUT/tp2-$N.json"
