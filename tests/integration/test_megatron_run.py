"""A whole run with ``--train-backend megatron``: the Megatron learner trains and every version
reaches the engines over the gloo broadcast (HF names gathered by policies/megatron/publish.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime import cli

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



@pytest.mark.parametrize(("flags", "line"), [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size: needs --train-backend megatron"),
    (["--train-backend", "megatron", "--lora-rank", "4"], "--lora-rank: LoRA trains on --train-backend fsdp"),
    (["--train-backend", "megatron", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size: TP x PP x CP = 2 must divide the learner's 1 rank(s)"),
    (["--train-backend", "megatron", "--sequence-parallel"], "--sequence-parallel: needs --tensor-model-parallel-size"),
])
def test_megatron_layouts_it_cannot_run_exit_2_in_one_line(flags, line, capsys):
    with pytest.raises(SystemExit) as e:
        cli.resolve([*flags, "--run-dir", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line in err
