"""Multi-turn runs end to end: the calculator tool recipe killed with SIGKILL mid-episode and resumed
with --load (nothing lost or trained twice, live episodes continued from their transcripts), and a
run whose tools hang and whose policy writes malformed calls (counted, the run goes on)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from runtime import checkpoint
from tests.integration.multi_turn_agents import HOLD
from tests.integration.runs import kill_run, launch, start, wait_for_checkpoint

CALC = ["--recipe", "calculator", "--eval-num-prompts", "8", "--global-batch-size", "32",
        "--rollout-batch-size", "4"]
GROUPS = 4  # a step's groups: 32 samples / 8 per prompt


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_multi_turn_run_sigkilled_mid_episode_resumes_without_losing_or_repeating_a_group(backend, tmp_path):
    steps, save = 8, tmp_path / "ckpt"
    flags = [*CALC, "--num-rollout", str(steps), "--save", str(save), "--save-interval", "3",
             "--custom-generate-function-path", "tests.integration.multi_turn_agents:held_after_a_turn"]
    first = tmp_path / "first"
    # groups 12.. (after the checkpoint's 3 steps of 4) hold after their first turn until the kill
    env = {**os.environ, HOLD: f"{3 * GROUPS},{GROUPS * 8}"}
    proc = start(first, backend, "--eval-interval", "0", *flags, stdout=subprocess.DEVNULL, start_new_session=True,
                 env=env)
    kill_run(proc, first, before=lambda: wait_for_checkpoint(proc))
    saved = checkpoint.load(save)
    # the checkpoint holds episodes caught mid-way: transcripts with turns, some not finished
    live = [s for g in saved.state.live for s in g.samples]
    held = set(range(3 * GROUPS, 4 * GROUPS))  # held after their first turn (multi_turn_agents.py)
    assert held <= {g.group_id for g in saved.state.live}, "no live episode in the checkpoint"
    assert all(s.turns for s in live if s.group_id in held)
    at = saved.state.version

    second = tmp_path / "second"
    done = launch(second, backend, *flags, "--load", str(save), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((second / "summary.json").read_text())
    ledger = summary["ledger"]
    assert summary["steps"] == steps and ledger["duplicates"] == 0 and ledger["dropped"] == {}
    assert ledger["admitted"] == ledger["trained"] + ledger["in_flight"]
    assert summary["counters"].get("replay_diverged", 0) == 0  # the calculator is deterministic: replays match
    before = [g for rec in read_jsonl(first / "groups.jsonl") if rec["step"] <= at for g in rec["groups"]]
    after = read_jsonl(second / "groups.jsonl")
    assert [r["step"] for r in after] == list(range(at + 1, steps + 1))
    trained = before + [g for rec in after for g in rec["groups"]]
    assert len(trained) == len(set(trained)) == steps * GROUPS == ledger["trained"]


@pytest.mark.slow  # ~1 min; the same faults are unit-tested in tests/actors/test_conversation.py
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_hung_tools_and_malformed_calls_are_counted_and_the_run_goes_on(backend, tmp_path):
    run_dir = tmp_path / "run"
    done = launch(run_dir, backend, *CALC, "--num-rollout", "4", "--eval-interval", "0", "--tool-timeout", "0.5",
                  "--custom-generate-function-path", "tests.integration.multi_turn_agents:hung_tool_sometimes")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    counters, ledger = summary["counters"], summary["ledger"]
    assert summary["steps"] == 4
    assert counters["tool_timeouts"] >= 1 and counters["episode_tool_timeout"] == counters["tool_timeouts"]
    assert counters["tool_calls_malformed"] >= 1  # a random-init policy writes broken calls
    assert ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"]
