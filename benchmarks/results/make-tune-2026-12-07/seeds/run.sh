#!/bin/bash
# Item 6 check: the sweep's pick and the default at training seeds 1 and 2 (seed 0 is the sweep's own), 6000 steps, source backbone.
# usage: run.sh "<pick overrides>"
cd /work/main
PICK="$1"
run() { name=$1; shift; OMP_NUM_THREADS=1 .venv/bin/python run.py train --local --set model.pretrained=source --set train.eval_interval=1000 --set train.checkpoint_interval=1000 --set train.log_interval=500 --set method.warmup_iters=1500 --set train.threads=1 "$@" --name $name --storage /tmp/verify/ck > /tmp/verify/$name.log 2>&1; echo "$name $(grep 'final val' /tmp/verify/$name.log)"; }
run pick-s1 $PICK --set train.seed=1 &
run default-s1 --set train.seed=1 &
wait
run pick-s2 $PICK --set train.seed=2 &
run default-s2 --set train.seed=2 &
wait
