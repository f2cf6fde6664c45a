"""A whole run with ``--train-backend megatron``: the Megatron learner trains and every version
reaches the engines over the gloo broadcast (HF names gathered by policies/megatron/publish.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")


def test_a_megatron_learner_run_broadcasts_every_version(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.launch", "--train-backend", "megatron", "--num-rollout", "12",
         "--eval-interval", "0", "--weight-transport", "gloo", "--run-dir", str(run_dir), "--progress", "off"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["weight_sync"]["transport"] == "gloo"
    assert summary["weight_sync"]["count"] == 12
    assert summary["evals"][-1]["min_token_version"] == 12  # the final eval ran on the last weights


def test_megatron_flags_without_the_backend_exit_2_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--pipeline-model-parallel-size", "2",
                           "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("--pipeline-model-parallel-size: needs --train-backend megatron")
