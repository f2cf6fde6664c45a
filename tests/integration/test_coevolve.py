"""Several agents in one run, end to end: ``python -m runtime.launch --recipe coevolve`` with real
engine subprocesses (one engine set per agent), real trainers and real HTTP; and the embedding
example. Each run is a few seconds of training after about fifteen of start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.metrics import read_metrics
from tests.integration.runs import engines_of, kill_run

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
        assert all({f"agent/{name}/reward/mean", f"agent/{name}/staleness/max", f"agent/{name}/learner/wait_frac"}
                   <= line.keys() for line in mine)
        assert any(f"agent/{name}/sync/total_s" in line for line in mine)  # the broadcaster's stats()
    # the episode driver's stats(): one schema on every line
    assert all({"episodes/started", "episodes/running", "episodes/wait_frac"} <= line.keys() for line in lines)
    assert lines[-1]["episodes/started"] >= lines[0]["episodes/started"] > 0
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


@pytest.mark.timeout(600)  # two start-ups of two agents each
def test_a_multi_agent_run_sigkilled_after_checkpoints_resumes_losing_and_repeating_nothing(tmp_path):
    """Each trained agent checkpoints at its own steps; SIGKILL of the launcher's process group after
    both have one, then --load: every agent ends at its step count, and every group of every agent
    is trained exactly once across the two runs (episodes running at a checkpoint are run again for
    the slots still live there)."""
    save, first, second = tmp_path / "ckpt", tmp_path / "first", tmp_path / "second"
    steps = {"proposer": 6, "solver": 12}
    flags = ["--recipe", "coevolve", "--agent", "proposer.num_steps=6", "--agent", "solver.num_steps=12",
             "--eval-interval", "0", "--eval-episodes", "0", "--progress", "lines", "--save", str(save),
             "--save-interval", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.launch", "--run-dir", str(first), *flags], cwd=ROOT,
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def both_checkpointed() -> None:
        saved: set[str] = set()
        for line in proc.stderr:
            if line.startswith("checkpoint at step"):
                saved |= {name for name in steps if f"/{name}/" in line}
            if saved == set(steps):
                return
        raise AssertionError(f"the run ended before both agents checkpointed (exit {proc.wait()})")

    kill_run(proc, first, before=both_checkpointed)
    # each agent's checkpoint the resume starts from (the resumed run saves into the same directory)
    at = {name: int((save / name / "latest").read_text().strip().removeprefix("step")) for name in steps}

    done = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(second), *flags, "--load",
                           str(save)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((second / "summary.json").read_text())
    records = [json.loads(x) for x in (first / "groups.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (second / "groups.jsonl").read_text().splitlines()]
    for name, n in steps.items():
        agent = summary["agents"][name]
        assert agent["version"] == n
        ledger = agent["ledger"]
        assert ledger["duplicates"] == 0
        assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
        before = [g for r in records if r["agent"] == name and r["step"] <= at[name] for g in r["groups"]]
        after = [r for r in resumed if r["agent"] == name]
        assert [r["step"] for r in after] == list(range(at[name] + 1, n + 1))
        trained = before + [g for r in after for g in r["groups"]]
        assert len(trained) == len(set(trained)) == ledger["trained"]
