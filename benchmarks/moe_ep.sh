#!/usr/bin/env bash
# Expert parallelism on one machine: the same MoE workload at EP=1 (one process) and EP=2 (and any other
# `TP:EP` layouts given), in one run. Mixtral shapes (random weights, written tensor by tensor): LAYERS x HIDDEN,
# HIDDEN/128 heads, one KV head per 512 of HIDDEN, EXPERTS SwiGLU experts of ffn 3.5 x HIDDEN, top-2, vocabulary
# 32000; greedy, ignore_eos, 128 prompt + 64 new tokens per request; one warm-up pass, median of 3. On CPU every
# layout gets the same cores: ROSETOOL_NUM_THREADS = CORES / ranks per rank (CORES: env, default nproc), so the
# one-process run is not left with fewer threads by the load-average rule of rosetool/runtime/host.py.
#
#   benchmarks/moe_ep.sh OUT_DIR [NUM_PROMPTS] [DEVICE] [DTYPE] [LAYERS] [HIDDEN] [EXPERTS] [LAYOUTS]
#
# CPU (2 ranks share the machine's cores, so this measures the cost of expert parallelism, not a speed-up):
#   benchmarks/moe_ep.sh bench-ep 16 cpu float32 4 512 8
# GPU, one node with 2+ H100/H200 (NCCL, rank r on cuda:r; 16 x 2048 with 8 experts is 5.6 B parameters, 11 GB
# in bf16, so EP=1 still fits one device and is the baseline), EP=1 vs EP=2 vs TP=2 vs TP=2 x EP=2:
#   benchmarks/moe_ep.sh bench-ep-gpu 256 cuda bfloat16 16 2048 8 "1:1 1:2 2:1 2:2"
# and a DeepSeek-V3-like MLA model through the same layouts: benchmarks/moe_runtime_vs_hf.py has its shapes.
set -euo pipefail
OUT=${1:?output folder}; N=${2:-16}; DEVICE=${3:-cpu}; DTYPE=${4:-float32}
LAYERS=${5:-4}; HIDDEN=${6:-512}; EXPERTS=${7:-8}; LAYOUTS=${8:-"1:1 1:2"}
mkdir -p "$OUT"
MODEL="$OUT/mixtral-${LAYERS}x${HIDDEN}-e${EXPERTS}-random"
[ -f "$MODEL/config.json" ] || python -c "
from pathlib import Path; import torch
from rosetool.converters.synthetic import mixtral_config, write_synthetic_hf
write_synthetic_hf(Path('$MODEL'), mixtral_config($LAYERS, $HIDDEN, vocab_size=32000, experts=$EXPERTS),
                   dtype=torch.bfloat16 if '$DTYPE' == 'bfloat16' else torch.float32)"
COMMON=(--backend rosetool --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --num-prompts "$N" --input-len 128
        --output-len 64 --ignore-eos --temperature 0 --warmup 1 --runs 3)
RESULTS=()
for layout in $LAYOUTS; do
  tp=${layout%:*}; ep=${layout#*:}
  ranks=$(( tp > ep ? tp : ep ))
  threads=$(( ${CORES:-$(nproc)} / ranks )); threads=$(( threads > 0 ? threads : 1 ))
  ROSETOOL_NUM_THREADS=$threads rosetool bench offline "${COMMON[@]}" --tp "$tp" --ep "$ep" \
    --save-result "$OUT/tp$tp-ep$ep-$N.json"
  RESULTS+=("$OUT/tp$tp-ep$ep-$N.json")
done
rosetool bench compare "${RESULTS[@]}"
