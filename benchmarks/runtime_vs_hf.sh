#!/usr/bin/env bash
# The runtime against HF generate on the same workload, in one run (issue 5's figure):
# GPT-2-small shapes (12 x 768, vocab 50257, random weights), greedy, ignore_eos, 128 prompt + 128 new tokens.
#
#   benchmarks/runtime_vs_hf.sh OUT_DIR [NUM_PROMPTS] [DEVICE] [DTYPE]
#   on an H100:  benchmarks/runtime_vs_hf.sh bench-h100 256 cuda float16   (then again with 64)
#   on a CPU:    benchmarks/runtime_vs_hf.sh bench-cpu 16 cpu float32
set -euo pipefail
OUT=${1:?output folder}; N=${2:-256}; DEVICE=${3:-cuda}; DTYPE=${4:-float16}
mkdir -p "$OUT"
MODEL="$OUT/gpt2-small-random"
[ -f "$MODEL/config.json" ] || python -c "
from pathlib import Path; import torch
from rosetool.converters.synthetic import gpt2_config, write_synthetic_hf
write_synthetic_hf(Path('$MODEL'), gpt2_config(12, 768, vocab_size=50257), dtype=torch.float16)"
COMMON=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --num-prompts "$N" --input-len 128 --output-len 128
        --ignore-eos --temperature 0 --warmup 1 --runs 3)
rosetool bench offline --backend rosetool "${COMMON[@]}" --save-result "$OUT/rosetool-$N.json"
rosetool bench offline --backend hf "${COMMON[@]}" --save-result "$OUT/hf-dynamic-$N.json"
rosetool bench offline --backend hf --hf-static-cache "${COMMON[@]}" --save-result "$OUT/hf-static-$N.json"
# prefix sharing: 4 prefixes of 96 tokens, caching on and off
PREFIX=(--workload prefix --prefix-len 96 --num-prefixes 4)
rosetool bench offline --backend rosetool "${COMMON[@]}" "${PREFIX[@]}" --save-result "$OUT/rosetool-prefix-on-$N.json"
rosetool bench offline --backend rosetool "${COMMON[@]}" "${PREFIX[@]}" --no-enable-prefix-caching \
  --save-result "$OUT/rosetool-prefix-off-$N.json"
rosetool bench compare "$OUT/rosetool-$N.json" "$OUT/hf-dynamic-$N.json" "$OUT/hf-static-$N.json" \
  "$OUT/rosetool-prefix-on-$N.json" "$OUT/rosetool-prefix-off-$N.json"
