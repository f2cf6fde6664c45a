#!/usr/bin/env bash
# Everything one lent GPU machine call does (nvidia-h200-x2: learner on GPU 0, engine on GPU 1):
# install the wheels the image lacks (.whl/, built by ../shared/device/wheels.sh plus pytest), run
# the GPU tests, then the two-GPU benchmark; prints the test summary and the benchmark's table.
#   run(kind="nvidia-h200-x2", carry=[".whl"], command="bash benchmarks/gpu_session.sh [benchmark flags]")
set -uo pipefail
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $out, the GPUs
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime/test_weight_transport.py tests/runtime/test_ipc_transport.py 2>&1 | tail -15
python3 benchmarks/gpu_sync.py --out /tmp/bench-gpu-sync "$@" 2>&1 | grep -v -e "Loading weights" -e "Writing model"
cp -r /tmp/bench-gpu-sync/*.md "$out/" 2>/dev/null || true
for run in /tmp/bench-gpu-sync/sync /tmp/bench-gpu-sync/async*; do  # timelines to read back here
  mkdir -p "$out/$(basename "$run")" && cp "$run"/{trace.json,metrics.jsonl,summary.json} "$out/$(basename "$run")/" 2>/dev/null
done
