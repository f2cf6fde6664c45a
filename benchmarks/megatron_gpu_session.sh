#!/usr/bin/env bash
# The Megatron learner on one lent GPU (nvidia-h200); each mode fits one device command:
#   all:   the GPU tests, the benchmark, then the Qwen3-0.6B-shaped megatron loop (what one call allows)
#   bench: the GPU tests (tests/policies/test_megatron_gpu.py: one step against the HF learner
#          within bf16, the default loop with --train-backend megatron), then
#          benchmarks/megatron_gpu.py (parity at the Qwen3-0.6B shape, tokens/s and peak memory
#          beside the HF learner at the learner-at-scale shapes, checkpoint save/load)
#   loops: the default recipe's task, time-boxed: megatron at the recipe's own shape, then megatron
#          and the fsdp (HF) learner on Qwen3-0.6B's body (below); prints each run's eval curve
#   lrs:   the default recipe's task on Qwen3-0.6B's body (its layers, widths and heads; the recipe's
#          14-token vocabulary: a random model over 151,936 ids never samples one of the task's
#          tokens, so every reward is 0 and no group has an advantage), megatron at three learning
#          rates side by side on the one GPU, time-boxed
#   run(kind="nvidia-h200", carry=[".whl"], command="bash benchmarks/megatron_gpu_session.sh bench")
# .whl/: megatron-core 0.16.1, msgspec, psutil, rich (+ deps), pytest (+ deps) for Python 3.12.
set -uo pipefail
mode=${1:-bench}
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $out, the GPUs
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" -W ignore::DeprecationWarning \
    tests/policies/test_megatron_gpu.py 2>&1 | tail -5
  timeout 220 python3 benchmarks/megatron_gpu.py --out "$out" 2>&1 | grep -v -e "Loading weights" -e "Writing model" \
    | grep -v Warning | tail -24
  [ "$mode" = bench ] && exit 0
fi
loop() {  # name seconds flags...: a time-boxed run (SIGTERM ends it with its summary), then its curve
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 -m runtime.launch --actor-num-gpus-per-node 1 --rollout-num-gpus 1 --colocate \
    --num-rollout 2000 --eval-interval 10 --run-dir "/tmp/loop_$name" --overwrite --progress lines "$@" > "$out/loop_$name.log" 2>&1
  python3 - "$name" "/tmp/loop_$name" <<'EOF'
import json, sys
name, run = sys.argv[1], sys.argv[2]
try:
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
except OSError as e:
    print(name, "no metrics:", e); sys.exit()
evals = [(r["step"], round(r["time_s"]), round(r["eval/reward"], 3)) for r in rows if "eval/reward" in r]
evals = evals[:: max(1, len(evals) // 12)] + evals[-1:]  # a dozen points of the curve
train = [r.get("learner/train_s", 0) for r in rows[1:]]
print(f"{name}: {len(rows)} steps, train_s/step {sum(train) / max(len(train), 1):.2f}, "
      f"stale max {max((r.get('staleness/max', 0) for r in rows), default=0)}; eval (step, s, reward): {evals}")
EOF
  tail -2 "$out/loop_$name.log"
}
body=(--num-layers 28 --hidden-size 1024 --num-attention-heads 16 --num-query-groups 8 --kv-channels 128
      --ffn-hidden-size 3072)
if [ "$mode" = lrs ]; then
  for lr in ${LRS:-1e-6 3e-6 1e-5}; do
    loop "megatron_body_lr$lr" "${SECS:-200}" --train-backend megatron "${body[@]}" --lr "$lr" &
  done
  wait
  exit 0
fi
if [ "$mode" = all ]; then
  loop megatron_body 170 --train-backend megatron "${body[@]}" --lr 3e-6
  exit 0
fi
loop megatron_small 150 --train-backend megatron
loop megatron_body 180 --train-backend megatron "${body[@]}" --lr 3e-6
loop fsdp_body 180 --train-backend fsdp "${body[@]}" --lr 3e-6
