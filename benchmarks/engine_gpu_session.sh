#!/usr/bin/env bash
# One lent single-GPU machine call for the engine at RL lengths (nvidia-h200):
#   profile: the GPU engine tests, then benchmarks/engine_gpu_profile.py and the engine alone at
#            512 x (128 + 1,024), by default and with eager layers + torch's sampler
#   lean:    the GPU engine tests, then engine_gpu_lengths.py at the two 512-row shapes only
#   quick:   the GPU engine tests, then the engine alone at 512 x (128 + 1,024) and 128 x (128 + 4,096)
#   final:   the GPU engine tests, benchmarks/engine_gpu_lengths.py (every
#            shape, HF generate beside it), then a colocated loop (default recipe, 10 steps)
#   run(kind="nvidia-h200", carry=[".whl"], command="bash benchmarks/engine_gpu_session.sh final")
# .whl/: msgspec, psutil, rich (+ markdown-it-py, mdurl, pygments) and pytest (+ pluggy,
# iniconfig, packaging, pytest-timeout) for Python 3.12 (see ../shared/device/wheels.sh).
set -uo pipefail
mode=${1:-final}
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $out, the GPUs
gpu_tests=(tests/policies/test_engine_kv.py tests/policies/test_engine_swap_versions.py tests/policies/test_triton_sample.py)
if [ "$mode" = profile ]; then  # the profile, then the engine at 512 x (128 + 1,024): default, and eager + torch sampler
  python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda or gpu" "${gpu_tests[@]}" 2>&1 | tail -6
  (cd benchmarks && timeout 300 python3 engine_gpu_profile.py 2>&1) | grep -v "Loading weights" | tee "$out/profile.txt"
  for variant in default eager; do
    env=(); [ $variant = eager ] && env=(ASYNCRL_ENGINE_COMPILE=0 ASYNCRL_ENGINE_SAMPLER=torch)
    echo "== engine, $variant"
    env "${env[@]}" timeout 150 python3 benchmarks/engine_gpu_lengths.py --shapes 512x128x1024 --skip-hf 2>&1 \
      | grep -v -e "Loading weights" -e "Writing model" | tail -3
  done
  exit 0
fi
python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda or gpu" "${gpu_tests[@]}" 2>&1 | tail -4
if [ "$mode" = quick ]; then
  timeout 200 python3 benchmarks/engine_gpu_lengths.py --shapes 512x128x1024,128x128x4096 --skip-hf --out "$out" \
    2>&1 | grep -v -e "Loading weights" -e "Writing model" | tee "$out/lengths.txt" | tail -8
  exit 0
fi
if [ "$mode" = lean ]; then  # what a short lease allows: the two 512-row shapes, HF beside them
  timeout 110 python3 benchmarks/engine_gpu_lengths.py --shapes 512x128x1024,512x20x256 --hf-steps 8 --out "$out" \
    2>&1 | grep -v -e "Loading weights" -e "Writing model" | tee "$out/lengths.txt" | tail -10
  exit 0
fi
timeout 300 python3 benchmarks/engine_gpu_lengths.py --hf-steps 16 --out "$out" 2>&1 | grep -v -e "Loading weights" \
  -e "Writing model" | tee "$out/lengths.txt" | tail -12
# the colocated loop: learner and engine on the one GPU, CUDA IPC weights, KV released around each step
timeout 120 python3 -m runtime.launch --run-dir /tmp/coloc --num-rollout 10 --eval-interval 0 --progress lines \
  --colocate --actor-num-gpus-per-node 1 --weight-transport ipc --max-staleness 1 2>&1 | tail -3
python3 -c "import json; s = json.load(open('/tmp/coloc/summary.json')); print({k: s.get(k) for k in ('status', 'steps', 'staleness_max_observed', 'engine_restarts')})"
