"""A workload with genuinely long-tailed answer lengths: the prompt says how long the answer must be.

Prompt ``<bos> 1 7 =``; the right response is seventeen ``x`` then ``<eos>``. Target lengths are
Pareto-distributed (``L = floor(2 / U ** (1 / ALPHA))``, capped at ``MAX_LEN``): median 3, p90 13,
p99 about 90, the cap one prompt in 140. This is the workload over-provisioning
(``--over-sampling-batch-size``) is meant for: without it a batch waits on its longest answer
while the engine decodes a handful of rows (``benchmarks/staleness_ablation.py overprov``).

Reward in [0, 1]: 0.8 x length score + 0.2 x share of ``x`` in the body (the response up to
``<eos>``; all of it when there is none), with length score ``min(len, L) / max(len, L)``: off by
a factor of two scores the same at every scale, so GRPO sees a gradient toward the target for
short and long targets alike.

A random-init policy ignores the prompt: it stops with probability about 1/15 per token (its
vocabulary), so its lengths are geometric (median ~10) whatever the target. Trained here, it
learns to stop early on the common short targets and then stops early everywhere: long targets
are too rare to hold their own. ``long_tail_warmup`` (Pareto index 0.5: one target in four is 32
or more) teaches long answers as well; 400 steps of it (Dr. GRPO, lr 5e-4: lr 1e-3 with std
normalisation oscillated between all-short and all-long) gave, on this recipe's prompts, answers
of median 3 tokens, p90 9 and p99 121 (the cap, the 120-token targets; it still answers 30-100
token targets short). The benchmark starts from that policy (``--hf-checkpoint``).
"""

from __future__ import annotations

import functools
import random

from buffers.types import Prompt, Sample
from launchers.recipes.recipe import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import EOS, word_tokenizer

ALPHA = 1.2  # Pareto tail index: smaller is heavier
MIN_LEN = 2  # Pareto scale: P(L >= x) = (MIN_LEN / x) ** ALPHA
MAX_LEN = 120  # cap on the target length; rollout_max_response_len admits it plus the <eos>
FILL = "x"
N_TRAIN = 20_000


def target_length(rng: random.Random, alpha: float = ALPHA) -> int:
    """One draw of the heavy-tailed target length (``MIN_LEN`` to ``MAX_LEN``)."""
    u = 1.0 - rng.random()  # (0, 1]
    return min(MAX_LEN, int(MIN_LEN / u ** (1 / alpha)))


def reward(prompt: Prompt, sample: Sample) -> float:
    words = sample.response_text.split()
    body = words[: words.index(EOS)] if EOS in words else words
    target = int(prompt.label)
    length = min(len(body), target) / max(len(body), target)
    content = sum(w == FILL for w in body) / len(body) if body else 0.0
    return (4 * length + content) / 5


def make_task(*, seed: int, eval_num_prompts: int, alpha: float = ALPHA) -> Task:
    tok = word_tokenizer([str(d) for d in range(10)] + ["=", FILL])
    rng = random.Random(seed)
    lengths = [target_length(rng, alpha) for _ in range(N_TRAIN + eval_num_prompts)]

    def prompt(i: int, target: int) -> Prompt:
        text = " ".join(["<bos>", *str(target), "="])
        return Prompt(index=i, input_ids=tok.encode(text), label=str(target), text=text)

    return Task(
        tokenizer=tok,
        train_prompts=[prompt(i, n) for i, n in enumerate(lengths[eval_num_prompts:])],
        # the eval set is a sample of the same distribution (targets repeat: there are only 120)
        eval_prompts=[prompt(i, n) for i, n in enumerate(lengths[:eval_num_prompts])],
        reward_path="launchers.recipes.long_tail:reward",
        stop_token_ids=[tok.eos_token_id],
    )


DEFAULTS = {
    "model": {"max_position_embeddings": 128},  # prompt (<= 5 tokens) + MAX_LEN + <eos>
    "rollout": {"rollout_max_response_len": MAX_LEN + 1, "num_rollout": 400},
    "grpo": {"normalize_advantage_std": False},  # near-constant groups would otherwise blow up noise
    "optimizer": {"lr": 5e-4},
}

RECIPE = Recipe(
    name="long_tail",
    description="answer with as many tokens as the prompt says (Pareto lengths, median 3, cap 120); "
    "for over-provisioning studies",
    defaults=DEFAULTS,
    make_task=make_task,
)

# The same task with a much heavier tail (median 8, one target in four >= 32): see the module doc.
RECIPE_WARMUP = Recipe(
    name="long_tail_warmup",
    description="long_tail with Pareto index 0.5 (one target in four >= 32): teaches long answers too",
    defaults=DEFAULTS,
    make_task=functools.partial(make_task, alpha=0.5),
)
