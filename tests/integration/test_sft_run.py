"""An SFT run through ``python -m runtime.launch --loss-type sft_loss`` (no engine starts; the
generator and buffer prefetch the next batches), then an RL run starting from its checkpoint with
``--hf-checkpoint``: the SFT-then-RL path a user takes, on a tiny model built here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runtime.metrics import read_metrics
from tests.launchers.chat_model import build_chat_model

ROOT = Path(__file__).resolve().parents[2]


def launch(run_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), "--progress", "lines",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_sft_trains_on_assistant_tokens_without_engines_and_rl_starts_from_it(tmp_path: Path) -> None:
    model = build_chat_model(tmp_path / "model")
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is {a} + {b}"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}
            for a in range(3) for b in range(3)]  # 9 rows
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = launch(tmp_path / "sft", "--hf-checkpoint", str(model), "--loss-type", "sft_loss",
                 "--calculate-per-token-loss", "--prompt-data", str(data), "--input-key", "messages",
                 "--apply-chat-template", "--rollout-shuffle", "--n-samples-per-prompt", "1",
                 "--rollout-batch-size", "3", "--global-batch-size", "3", "--num-epoch", "8", "--lr", "1e-2",
                 "--max-staleness", "2", "--save", str(tmp_path / "ckpt"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    lines = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert len(lines) == 9 * 8 // 3  # --num-epoch 8 over 9 rows, 3 a step
    assert all("data/prefetch_queue_depth" in line and line["train/n_samples"] == 3 for line in lines)
    assert max(line["data/prefetch_queue_depth"] for line in lines) >= 1  # batches were read ahead of the learner
    # 4-6 trained tokens a row ("a + b = c <|end|>" and, when c > 9, its two digits): never the prompt's
    assert all(4 * 3 <= line["train/n_tokens"] <= 6 * 3 for line in lines)
    first, last = lines[0]["train/loss"], lines[-1]["train/loss"]
    assert last < 0.5 * first, (first, last)
    assert not list((tmp_path / "sft" / "logs").glob("engine*.log"))  # no engine was started
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ledger"]["trained"] == 24 * 3

    sft_model = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip() / "model"
    assert (sft_model / "tokenizer.json").is_file() and (sft_model / "generation_config.json").is_file()
    prompts = tmp_path / "rl.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {a} + 1", "label": f"{a} + 1 = {a + 1}"}) + "\n"
                               for a in range(4)))
    rl = launch(tmp_path / "rl", "--hf-checkpoint", str(sft_model), "--prompt-data", str(prompts),
                "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "f1",
                "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
                "--rollout-max-response-len", "6", "--num-rollout", "2", "--eval-interval", "0")
    assert rl.returncode == 0, rl.stderr[-3000:]
    rl_lines = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert len(rl_lines) == 2
    # the RL run's engine serves the SFT model: it answers in the trained format from the first step
    assert rl_lines[0]["reward/mean"] > 0.3, rl_lines[0]
