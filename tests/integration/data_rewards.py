"""Reward plug-ins for the prompt-file runs: exact match that also records which prompt (cursor
index, text) each scored sample answered, to the file named by $ASYNCRL_TEST_PROMPT_LOG."""

from __future__ import annotations

import json
import os

from buffers.types import Prompt, Sample


def exact_and_record(prompt: Prompt, sample: Sample) -> float:
    if sample.group_id >= 0:  # training prompts (evaluation samples have ids below 0)
        with open(os.environ["ASYNCRL_TEST_PROMPT_LOG"], "a") as f:
            f.write(json.dumps([prompt.index, prompt.text]) + "\n")
    return float(sample.response_text.strip() == prompt.label)
