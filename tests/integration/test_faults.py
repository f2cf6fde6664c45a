"""Faults on whole runs: engines SIGKILLed and SIGSTOPped mid-run, and the run itself SIGKILLed
and resumed, on both backends. Real processes, real signals; nothing here is faked but the timing
of the faults."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.runs import (
    GROUPS_PER_STEP,
    LOCAL_AND_SLOW_RAY,
    assert_ray_released,
    engines_of,
    kill_run,
    launch,
    start,
    wait_for_checkpoint,
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ~80 s locally, 140-220 s on Ray (restarts ~12 s): -m slow, for CI's 10 minutes; the default suite
# keeps a killed and a hung engine restarted (tests/runtime/test_engines.py) and nothing lost across
# a SIGKILL (the resume tests below)
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"], indirect=True)
def test_engines_killed_and_hung_mid_run_are_restarted_and_nothing_is_lost(backend, tmp_path):
    run_dir = tmp_path / "chaos"
    done = launch(run_dir, backend, "--num-rollout", "300", "--rollout-num-engines", "2",
                  "--chaos-kill-interval", "6", "--chaos-hang-at", "2", "--health-check-timeout", "2",
                  "--max-engine-restarts", "50", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger, counters = summary["ledger"], summary["counters"]
    assert summary["steps"] == 300
    assert ledger["duplicates"] == 0 and ledger["dropped"] == {}
    assert ledger["admitted"] == ledger["trained"] + ledger["in_flight"]
    # how many kills land depends on the machine's speed; one kill and the hang are the point
    assert counters["chaos_kills"] >= 1 and counters["chaos_hangs"] == 1
    assert counters["engine_failures"] >= 2
    restarts = summary["engine_restarts"]
    assert counters["engine_restarts"] == len([r for r in restarts if r["refit_version"] is not None]) >= 1
    assert any("health probe" in r["reason"] or "no request finished" in r["reason"] for r in restarts), restarts
    for r in restarts:
        if r["first_version"] is not None:  # refit before serve: never older than current when sent
            assert int(r["first_version"]) >= r["current_at_first"] >= r["refit_version"], r
    assert summary["staleness_max_observed"] <= 1
    assert not engines_of(run_dir)


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"])
@pytest.mark.parametrize("backend", LOCAL_AND_SLOW_RAY, indirect=True)  # on Ray: two start-ups, ~35 s
def test_a_run_sigkilled_after_a_checkpoint_resumes_without_losing_or_repeating_a_group(backend, lora, tmp_path):
    """SIGKILL of the launcher's whole process group: on local it takes the engines and the trainer
    with it; on Ray the cluster ends the dead driver's actors (and their engine servers) and frees
    its placement group, and the resumed run is placed on the same cluster. With LoRA the resumed
    engines start on the checkpoint's base and load its adapter before serving (refit before serve);
    the trainer's side of a LoRA resume is exact to the bit (tests/policies/test_lora.py)."""
    sigkill_then_resume(backend, tmp_path, lora=lora)


@pytest.mark.slow  # ~160 s on a busy 2-core machine; tests/integration/test_megatron_run.py is the short one
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_megatron_learner_run_sigkilled_after_a_checkpoint_resumes_the_same_way(backend, tmp_path):
    """The same guarantee with ``--train-backend megatron``, its weights broadcast over gloo every
    version (policies/megatron/publish.py) and its resume state from its own checkpoint files."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    sigkill_then_resume(backend, tmp_path, "--train-backend", "megatron", "--weight-transport", "gloo")


@pytest.mark.slow  # ~1.25x the full run's time; tests/policies/test_trainer_dp.py keeps DP's exactness and resume
@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_two_rank_learner_run_sigkilled_after_a_checkpoint_resumes_the_same_way(backend, tmp_path):
    """The same guarantee with two data-parallel CPU ranks (FSDP2 over gloo), their weights gathered
    bucket by bucket and broadcast over gloo, the optimizer's shards resumed from ``optimizer/``."""
    sigkill_then_resume(backend, tmp_path, "--actor-num-cpu-ranks", "2", "--weight-transport", "gloo")


def sigkill_then_resume(backend, tmp_path, *extra: str, lora: bool = False) -> None:
    steps, save = 30, tmp_path / "ckpt"
    flags = ["--num-rollout", str(steps), "--save", str(save), "--save-interval", "5",
             *(["--lora-rank", "8"] if lora else []), *extra]
    first = tmp_path / "first"
    proc = start(first, backend, "--eval-interval", "0", *flags, stdout=subprocess.DEVNULL,
                 start_new_session=True)

    def after_the_first_checkpoint() -> None:
        wait_for_checkpoint(proc)
        time.sleep(random.uniform(0.0, 2.0))  # a random moment after it

    kill_run(proc, first, before=after_the_first_checkpoint)
    if backend.name == "ray":  # the dead driver's controller, which checkpoints, is gone too
        assert_ray_released()
    checkpoint = int((save / "latest").read_text().strip().removeprefix("step"))

    second = tmp_path / "second"
    done = launch(second, backend, *flags, "--load", str(save), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == steps
    ledger = summary["ledger"]
    assert ledger["duplicates"] == 0 and ledger["dropped"] == {}
    assert ledger["admitted"] == ledger["trained"] + ledger["in_flight"]
    assert summary["staleness_max_observed"] <= 1

    before = [g for rec in read_jsonl(first / "groups.jsonl") if rec["step"] <= checkpoint for g in rec["groups"]]
    after_recs = read_jsonl(second / "groups.jsonl")
    assert [r["step"] for r in after_recs] == list(range(checkpoint + 1, steps + 1))
    trained = before + [g for rec in after_recs for g in rec["groups"]]
    assert len(trained) == len(set(trained)) == steps * GROUPS_PER_STEP == ledger["trained"]
    assert set(trained) <= set(range(ledger["admitted"]))  # every trained group was admitted, once
    if lora and backend.name == "local":
        log = (second / "logs" / "engine0.log").read_text()
        first_load = log[log.index("merged LoRA adapter"):].splitlines()[0]
        assert f"policy-v{checkpoint} from {save / f'step{checkpoint}' / 'adapter'}" in first_load
