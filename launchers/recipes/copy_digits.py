"""The embedded default task: copy a string of digits.

Prompt ``<bos> 3 7 1 =``; the right response is ``3 7 1 <eos>``. Reward in [0, 1]:
0.8 x (share of digit positions right) + 0.2 x (exactly ``DIGITS`` digits then ``<eos>``).
A random policy scores about 0.05, a constant one at most 0.28 (0.08 for one right digit in three,
plus the length bonus), a perfect one 1.0. A random-init 2-layer transformer learns it from RL
alone in a few hundred GRPO steps, about a minute and a half on two CPU cores: the model must
learn to attend back to the prompt position matching each response position.

Of the 1000 possible prompts, ``eval_num_prompts`` are held out for evaluation.
"""

from __future__ import annotations

import functools
import random

from buffers.types import Prompt, Sample
from launchers.recipes.recipe import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import EOS, word_tokenizer

DIGITS = 3


def reward(prompt: Prompt, sample: Sample) -> float:
    words = sample.response_text.split()
    body = words[: words.index(EOS)] if EOS in words else words
    right = sum(a == b for a, b in zip(body, prompt.label))
    well_formed = EOS in words and len(body) == len(prompt.label)
    return (4 * right / len(prompt.label) + well_formed) / 5


def make_task(*, seed: int, eval_num_prompts: int, digits: int = DIGITS) -> Task:
    tok = word_tokenizer([str(d) for d in range(10)] + ["="])
    triples = [f"{i:0{digits}d}" for i in range(10**digits)]
    random.Random(seed).shuffle(triples)
    if not 0 < eval_num_prompts < len(triples):
        raise ValueError(f"eval_num_prompts must be in 1..{len(triples) - 1}")

    def prompt(i: int, digits: str) -> Prompt:
        text = " ".join(["<bos>", *digits, "="])
        return Prompt(index=i, input_ids=tok.encode(text), label=digits, text=text)

    held_out = [prompt(i, d) for i, d in enumerate(triples[:eval_num_prompts])]
    train = [prompt(i, d) for i, d in enumerate(triples[eval_num_prompts:])]
    return Task(
        tokenizer=tok,
        train_prompts=train,
        eval_prompts=held_out,
        reward_path="launchers.recipes.copy_digits:reward",
        stop_token_ids=[tok.eos_token_id],
    )


RECIPE = Recipe(
    name="default",
    description="copy three digits; 2-layer random-init Qwen3-shaped model on CPU",
    # lr 5e-4 over 400 steps reached eval reward 1.0 on seeds 2, 3 and 1234 (1e-3 over 200 steps
    # plateaued at 0.63-0.71 on seed 2: a digit position the policy stopped exploring)
    defaults={"rollout": {"rollout_max_response_len": 6, "num_rollout": 400}, "optimizer": {"lr": 5e-4}},
    make_task=make_task,
)


RECIPE_4 = Recipe(
    name="copy4",
    description="copy four digits: the default task made harder, for the staleness ablation",
    defaults={"rollout": {"rollout_max_response_len": 7, "num_rollout": 300}, "optimizer": {"lr": 5e-4}},
    make_task=functools.partial(make_task, digits=4),
)
