#!/usr/bin/env bash
# The compiled worker on the GPU host (docs/BENCHMARKS.md, issue 15): for max batch 32, then 1,
# a cold-cache start with answers encoded in a thread, then a warm-cache start with them
# encoded in processes, each under closed-loop load; start-up figures and results to $OUT.
set -uo pipefail
OUT="${OUT:-bench-out}"
MODEL="${MODEL:-/tmp/sd15}"
CACHE="${CACHE:-/tmp/compile-cache}"
LOGS=/tmp/compiled-worker-logs
mkdir -p "$OUT" "$LOGS"
[ -f "$MODEL/model_index.json" ] || python3 -m worker make-model "$MODEL" --arch sd15 --fp16 | tail -1
run() {  # tag, batch size, concurrency multiples, encoder processes
  python3 bench/worker_throughput.py --model "$MODEL" --batch-sizes "$2" --systems worker --concurrency "$3" \
    --warmup-s 3 --duration-s 8 --compile-cache-dir "$CACHE" --worker-args "--encode-processes $4" \
    --logs "$LOGS/$1" 2>&1 | grep -E "^worker" | sed "s/^/$1 /" | tee -a "$OUT/compiled-worker.txt"
  for f in results startup; do sed "s/^{/{\"run\": \"$1\", /" "$LOGS/$1/$f.jsonl" >> "$OUT/compiled-worker-$f.jsonl"; done
  grep -h "compiled\|ready after" "$LOGS/$1"/worker-b*.log | sed "s/^/$1 /" >> "$OUT/compiled-worker-log.txt"
}
run b32-cold-thread 32 2 0
run b32-warm-processes 32 2 2
run b1-cold-processes 1 1,2 2
run b1-warm-thread 1 1,2 0
