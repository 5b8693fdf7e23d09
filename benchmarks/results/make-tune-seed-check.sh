#!/bin/bash
# Issue 23, item 6: a `make tune` pick against the default configuration and supervised training
# at given training seeds, with the sweep's settings (6000 steps, source backbone, warm-up 1500),
# `train --local`, two runs at a time, one console log per run in OUT.
#   usage: make-tune-seed-check.sh OUT "<the pick's --set overrides>" RUN [RUN ...]
#   RUN: pick-s<seed>, default-s<seed> or supervised-s<seed>; in order, two at a time.
# 2026-12-07: make-tune-2026-12-07/seeds "--set method.lambda_st=1.3647 --set method.tau_t=0.8486"
#   pick-s1 default-s1 pick-s2 default-s2; make-tune-grid-2026-12-07/seeds: see the README.
cd "$(dirname "$0")/../.."
OUT=$1 PICK=$2; shift 2
STORE=/tmp/seed-check/$(echo "$OUT" | tr / _)  # checkpoints stay out of the repository
mkdir -p "$OUT" "$STORE"
run() {
    local name=$1 seed=${1##*-s} extra=""
    case $name in pick-*) extra=$PICK ;; supervised-*) extra="--set method.name=supervised" ;; esac
    OMP_NUM_THREADS=1 .venv/bin/python run.py train --local --set model.pretrained=source \
        --set train.eval_interval=1000 --set train.checkpoint_interval=1000 --set train.log_interval=500 \
        --set method.warmup_iters=1500 --set train.threads=1 $extra --set train.seed=$seed \
        --name "$name" --storage "$STORE" > "$OUT/$name.log" 2>&1
    echo "$name $(grep 'final val' "$OUT/$name.log")"
}
for name in "$@"; do  # two at a time: the next starts when either finishes
    [ "$(jobs -rp | wc -l)" -ge 2 ] && wait -n
    run "$name" &
done
wait
