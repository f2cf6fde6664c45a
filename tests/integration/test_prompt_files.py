"""A user's own prompt file and HF model through ``python -m runtime.launch``: the chat template,
stop tokens, a verifier, named eval sets, and a resume that continues the shuffled data order
exactly where the checkpoint left it, across an epoch boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.file_task import file_task
from runtime.checkpoint import load
from runtime.metrics import read_metrics
from tests.launchers.chat_model import build_chat_model

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6  # fewer than a run takes: the order crosses epochs

def launch(run_dir: Path, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--progress", "lines",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)

# the cursor's exact resume across an epoch stays in the default suite (tests/launchers/test_prompt_data.py)
@pytest.mark.slow
@pytest.mark.timeout(600)  # two short runs: ~60 s on an idle 2-core machine, several times that when busy
def test_prompt_file_run_and_exact_resume(tmp_path: Path) -> None:
    model = build_chat_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {a} + {a}", "answer": str(2 * a)}) + "\n"
                            for a in range(ROWS)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"question": [{"role": "user", "content": "7 + 1"}], "answer": "8"}) + "\n")
    log = tmp_path / "prompts.jsonl"
    env = dict(os.environ, ASYNCRL_TEST_PROMPT_LOG=str(log))
    common = ["--hf-checkpoint", str(model), "--prompt-data", str(data), "--input-key", "question",
              "--label-key", "answer", "--apply-chat-template", "--rollout-shuffle", "--rollout-seed", "3",
              "--custom-rm-path", "tests.integration.data_rewards:exact_and_record",
              "--eval-prompt-data", "held", str(held), "--eval-interval", "2",
              "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
              "--rollout-max-response-len", "4", "--max-staleness", "0", "--save", str(tmp_path / "ckpt"),
              "--save-interval", "2"]
    first = launch(tmp_path / "a", *common, "--num-rollout", "4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert len(lines) == 4 and any("eval/held" in line for line in lines)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evals"][-1]["sets"].keys() == {"held"}
    # the checkpoint of step 4: resume from it and run two more steps
    state = load(tmp_path / "ckpt").state
    assert state.version == 4
    seen_first = [tuple(x) for x in map(json.loads, log.read_text().splitlines())]
    log.unlink()
    second = launch(tmp_path / "b", *common, "--num-rollout", "6", "--load", str(tmp_path / "ckpt"), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    seen_second = [tuple(x) for x in map(json.loads, log.read_text().splitlines())]
    # every prompt either run answered is the one the shuffled epoch order puts at its cursor
    task = file_task(model_dir=str(model), prompt_data=str(data), input_key="question", label_key="answer",
                     metadata_key="", apply_chat_template=True, template_kwargs="", shuffle=True, seed=3)
    assert all(text == task.train_prompt(i).text for i, text in seen_first + seen_second)
    # the resumed run continues at the checkpoint's cursor: only live groups' prompts come from before it
    live = {g.prompt.index for g in state.live} | {g.prompt.index for g in state.buffer.ready}
    new = {i for i, _ in seen_second} - live
    assert min(new) == state.cursor and max(i for i, _ in seen_first + seen_second) >= 2 * ROWS  # epoch 3
    ledger = json.loads((tmp_path / "b" / "summary.json").read_text())["ledger"]
    assert ledger["trained"] == 6 * 2 and ledger["duplicates"] == 0
