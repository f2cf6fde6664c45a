"""A harder task with long-tailed answer lengths: copy a string of 1 to 8 digits.

Prompt ``<bos> 4 0 9 2 =``; the right response is ``4 0 9 2 <eos>``. Lengths are drawn with
P(L = k) proportional to 0.6^(k-1), so most answers are one to three tokens and a few are nine:
the long tail that over-provisioning (``--over-sampling-batch-size``) is for. The reward is the
default task's (``copy_digits.reward``): 0.8 x share of positions right + 0.2 x right length.
The policy must learn both to copy by position and to stop at the right length; it learns more
slowly than the default task, which leaves room for stale data to hurt (the staleness ablation in
``benchmarks/staleness_ablation.py`` runs on it).
"""

from __future__ import annotations

import random

from buffers.types import Prompt
from launchers.recipes.recipe import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import word_tokenizer

MAX_DIGITS = 8
DECAY = 0.6
N_TRAIN = 20_000


def _length(rng: random.Random) -> int:
    weights = [DECAY**k for k in range(MAX_DIGITS)]
    return rng.choices(range(1, MAX_DIGITS + 1), weights=weights)[0]


def make_task(*, seed: int, eval_num_prompts: int) -> Task:
    tok = word_tokenizer([str(d) for d in range(10)] + ["="])
    rng = random.Random(seed)
    strings = ["".join(rng.choice("0123456789") for _ in range(_length(rng))) for _ in range(N_TRAIN)]
    held = set(strings[:eval_num_prompts])

    def prompt(i: int, digits: str) -> Prompt:
        text = " ".join(["<bos>", *digits, "="])
        return Prompt(index=i, input_ids=tok.encode(text), label=digits, text=text)

    # held-out strings never appear in training (short ones are few, so many are shared: drop them)
    train = [prompt(i, d) for i, d in enumerate(s for s in strings[eval_num_prompts:] if s not in held)]
    return Task(
        tokenizer=tok,
        train_prompts=train,
        eval_prompts=[prompt(i, d) for i, d in enumerate(strings[:eval_num_prompts])],
        reward_path="launchers.recipes.copy_digits:reward",
        stop_token_ids=[tok.eos_token_id],
    )


RECIPE = Recipe(
    name="copy_long",
    description="copy 1-8 digits (long-tailed lengths); harder, for staleness and over-provisioning studies",
    defaults={"rollout": {"rollout_max_response_len": 10, "num_rollout": 300}, "optimizer": {"lr": 5e-4}},
    make_task=make_task,
)
