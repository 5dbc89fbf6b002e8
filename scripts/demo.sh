#!/usr/bin/env bash
# The main job on the embedded defaults: makes .venv (if missing), installs skippipe, trains the debug
# model on 8 local ranks with skip ratio 0.25 on the built-in corpus, then evaluates it with stages omitted.
# Everything lands in runs/demo (override with RUN_DIR=...; STEPS=... for a longer run, continuing it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
STEPS=${STEPS:-60}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A demo run dir that already holds the demo's run is continued (STEPS=300 after the default 60 trains
# on to step 300), never overwritten; its omission report is the evaluation of the newest checkpoint.
RESUME=()
if [ -f "$RUN_DIR/metrics.jsonl" ]; then
    RESUME=(--resume) && echo "demo: continuing the run in $RUN_DIR to step $STEPS"
else
    echo "demo: a new run in $RUN_DIR, $STEPS steps, then its omission evaluation"
fi
torchrun --standalone --nproc-per-node 8 scripts/train.py --config configs/train/debug.yaml \
    --skip-ratio 0.25 --seed 0 --steps "$STEPS" --run-dir "$RUN_DIR" "${RESUME[@]}"
python scripts/evaluate.py --checkpoint "$RUN_DIR" --keep 1.0,0.75,0.5 --overwrite \
    --json "$RUN_DIR/omission.json" --csv "$RUN_DIR/omission.csv" --plot "$RUN_DIR/omission.png"
