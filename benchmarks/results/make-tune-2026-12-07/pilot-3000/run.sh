#!/bin/bash
# Pilot for item 6: does a mid budget (3000 iters, warm-up 1000) separate settings beyond seed noise?
cd /work/main
COMMON="--set model.pretrained=source --set train.iters=3000 --set train.eval_interval=1000 --set train.checkpoint_interval=3000 --set method.warmup_iters=1000 --set method.rampup_iters=500"
BEST="--set method.tau_t=0.955 --set method.lambda_st=1.2 --set method.lambda_ss=0.3 --set method.ema_decay=0.994"
run() { name=$1; shift; OMP_NUM_THREADS=1 .venv/bin/python run.py train --local $COMMON --set train.threads=1 "$@" --name $name --storage /tmp/pilot/ck > /tmp/pilot/$name.log 2>&1; echo "$name $(grep 'final val' /tmp/pilot/$name.log)"; }
for s in 0 1; do
  run def-s$s --set train.seed=$s &
  run best-s$s $BEST --set train.seed=$s &
  wait
done
run sup-s0 --set method.name=supervised --set train.seed=0 &
run sup-s1 --set method.name=supervised --set train.seed=1 &
wait
