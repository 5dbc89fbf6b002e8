#!/usr/bin/env bash
# The real-shape smoke run (configs/train/real-shape.yaml) under torchrun, then its figures: step-1 loss
# (against ln 32000 = 10.37), seconds per step, and each rank's peak resident memory (VmHWM, read by a
# watcher every second while the run lasts). Usage: scripts/real_shape.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/real-shape}
if [ -e "$RUN_DIR" ]; then echo "error: $RUN_DIR exists; pass another run dir or remove it" >&2; exit 2; fi
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
torchrun --standalone --nproc-per-node 6 scripts/train.py --config configs/train/real-shape.yaml --run-dir "$RUN_DIR" &
LAUNCHER=$!
mkdir -p "$RUN_DIR"
PEAKS="$RUN_DIR/peak_rss_kib.txt"
: > "$PEAKS.tmp"
while kill -0 "$LAUNCHER" 2>/dev/null; do
  for pid in $(pgrep -P "$LAUNCHER" || true); do
    rank=$( (tr '\0' '\n' < "/proc/$pid/environ" | sed -n 's/^RANK=//p') 2>/dev/null || true)
    hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$rank" ] && [ -n "$hwm" ] && echo "$rank $hwm" >> "$PEAKS.tmp"
  done
  sleep 1
done
wait "$LAUNCHER"
sort -n -k1,1 -k2,2 "$PEAKS.tmp" | awk '{peak[$1]=$2} END {for (r in peak) print r, peak[r]}' | sort -n > "$PEAKS"
rm -f "$PEAKS.tmp"
python - "$RUN_DIR" <<'PY'
import json, math, sys
run = sys.argv[1]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
peaks = dict(line.split() for line in open(f"{run}/peak_rss_kib.txt"))
summary = {"step1_loss": records[0]["loss"], "ln_vocab": math.log(32000),
           "step1_within_0.5": abs(records[0]["loss"] - math.log(32000)) <= 0.5,
           "seconds_per_step": [r["iteration_s"] for r in records],
           "peak_rss_gib_per_rank": {int(r): int(k) / 2**20 for r, k in sorted(peaks.items(), key=lambda x: int(x[0]))}}
json.dump(summary, open(f"{run}/real_shape_summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
