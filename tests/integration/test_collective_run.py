"""A whole run whose weights travel by broadcast (gloo on CPUs: the NCCL path with another backend)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_a_run_over_the_gloo_transport_syncs_every_version_without_files(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.launch", "--num-rollout", "40", "--eval-interval", "0",
         "--weight-transport", "gloo", "--rollout-num-engines", "2", "--run-dir", str(run_dir), "--progress", "off"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    sync = summary["weight_sync"]
    # every version is broadcast (the learner waits for it), over one group of both engines
    assert (sync["transport"], sync["count"], sync["regroups"]) == ("gloo", 40, 1)
    assert summary["staleness_max_observed"] <= 1
    assert summary["evals"][-1]["min_token_version"] == 40  # the final eval ran on the last weights
