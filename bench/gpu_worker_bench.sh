#!/usr/bin/env bash
# The worker benchmark as run on the GPU host (docs/BENCHMARKS.md): builds the sd15 model,
# then runs bench/worker_throughput.py with the arguments given (defaults: every system,
# max batch 1,4,8,12,16, clients at twice the max batch). Results and logs go to $OUT.
set -euo pipefail
OUT="${OUT:-bench-out}"
MODEL="${MODEL:-/tmp/sd15}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
if [ ! -f "$MODEL/model_index.json" ]; then
  /usr/bin/time -f "make-model sd15: %e s" python3 -m worker make-model "$MODEL" --arch sd15 --fp16
fi
python3 bench/worker_throughput.py --model "$MODEL" --logs "$OUT/logs" "$@"
