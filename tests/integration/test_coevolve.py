"""Several agents in one run, end to end: ``python -m runtime.launch --recipe coevolve`` with real
engine subprocesses (one engine set per agent), real trainers and real HTTP; and the embedding
example. Each run is a few seconds of training after about fifteen of start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runtime.metrics import read_metrics
from tests.integration.runs import engines_of

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--recipe", "coevolve", "--agent", "proposer.num_steps=6", "--agent", "solver.num_steps=12",
         "--eval-interval", "6", "--eval-episodes", "4", "--progress", "lines"]


def launch(run_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *SHORT, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_coevolve_trains_each_agent_on_its_own_engines(tmp_path):
    run_dir = tmp_path / "co"
    proc = launch(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 18
    for name, steps in (("proposer", 6), ("solver", 12)):
        agent = summary["agents"][name]
        assert agent["version"] == steps and agent["weight_syncs"] >= 1
        # each engine reports its own agent's final version: the other agent's updates never reached it
        assert agent["engine_versions"] == [str(steps)]
        assert agent["staleness_max_observed"] <= agent["max_staleness"]
        ledger = agent["ledger"]
        assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
        assert ledger["duplicates"] == 0
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert len(lines) == 18 and [line["step"] for line in lines] == list(range(1, 19))
    for name in ("proposer", "solver"):
        mine = [line for line in lines if line["agent"] == name]
        assert [line[f"agent/{name}/version"] for line in mine] == list(range(1, len(mine) + 1))
        assert all({f"agent/{name}/reward/mean", f"agent/{name}/staleness/max"} <= line.keys() for line in mine)
    assert any("agent/proposer/eval/reward" in line for line in lines)
    assert "[agents.solver]" in (run_dir / "config.toml").read_text()
    assert not engines_of(run_dir)


def test_a_frozen_agent_is_served_and_episode_errors_are_counted(tmp_path):
    config = tmp_path / "frozen.toml"
    config.write_text('[agents.proposer]\nfrozen = true\n\n[episodes]\n'
                      'episode_fn = "tests.integration.bad_episodes:raises_sometimes"\n')
    run_dir = tmp_path / "fz"
    proc = launch(run_dir, "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    proposer, solver = summary["agents"]["proposer"], summary["agents"]["solver"]
    assert proposer["frozen"] and proposer["version"] == 0 and proposer["weight_syncs"] == 0
    assert proposer["engine_versions"] == ["0"] and proposer["ledger"]["admitted"] == 0
    assert solver["version"] == 12 and solver["engine_versions"] == ["12"]
    assert summary["counters"]["episode_errors"] >= 3 and solver["ledger"]["dropped"]["episode_error"] >= 3
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert {line["agent"] for line in lines} == {"solver"} and lines[-1]["faults/episode_errors"] >= 3


def test_an_invalid_agent_table_exits_2_with_one_line_naming_the_field(tmp_path):
    proc = launch(tmp_path / "bad", "--agent", "solver.lr=-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "[agents.solver] lr" in proc.stderr


def test_the_embedding_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, "examples/two_generators_one_learner.py", "--steps", "3",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3:" in proc.stdout and "done: version 3" in proc.stdout
    assert not engines_of(tmp_path)
