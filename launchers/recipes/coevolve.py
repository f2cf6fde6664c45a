"""Co-evolution: a proposer writes digit strings, a solver copies them; each one's reward depends
on the other's policy.

One episode:
    proposer  ``<bos> 7 ?``            -> 8 problems, e.g. ``4 0 9 <eos>``: the digits it starts with,
                                          at most ``MAX_DIGITS``; an answer without one poses none
    solver    ``<bos> 4 0 9 =`` x each -> 4 answers per problem; ``4 0 9 <eos>`` is right
Rewards:
    solver    the default task's copy score (``copy_digits.reward``): 0.8 x share of positions
              right + 0.2 x right length then <eos>
    proposer  0.2 for posing a problem, plus 0.8 x 4p(1 - p) with ``p`` the share of the solver's
              answers that are exactly right: most when the solver solves it half the time (hard
              but solvable, and a problem the solver still learns from); 0 for posing none
While the solver learns, short strings are solved more often than long ones, so the proposer's
policy sets the solver's reward (the difficulty of what it is asked), and the solver's policy sets
the proposer's (a problem it has mastered, or cannot do at all, is worth little): as the solver
gets better, the proposer's best problems move. An entropy bonus keeps the proposer exploring.

Both agents are 2-layer random-init models of their own, trained at the same time: the proposer on
one group of 8 problems per episode, the solver on up to 8 groups of 4 answers (one per problem).
Episode figures (``episode/problem_len``, ``episode/posed``) are on every metrics line. Evaluation
episodes run both greedily on 16 fixed seeds (one problem, one answer), and score the solver alone
on a fixed problem of every length (``eval/episode/solver_fixed``), whatever the proposer writes.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

from buffers.types import Prompt, Sample
from launchers.recipes.copy_digits import reward as copy_score
from launchers.recipes.recipe import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import word_tokenizer

if TYPE_CHECKING:
    from actors.episodes import Episode

MAX_DIGITS = 5
PROBLEMS = 8  # proposer samples per episode
ANSWERS = 4  # solver samples per problem


def problem_of(text: str) -> str:
    """The digits a proposer's answer starts with (up to its first other token), at most
    ``MAX_DIGITS``; "" if none. A random policy writes every length, most often short ones."""
    digits = itertools.takewhile(str.isdigit, text.split())
    return "".join(digits)[:MAX_DIGITS]


def proposer_reward(solve_rate: float) -> float:
    return 0.2 + 0.8 * 4 * solve_rate * (1 - solve_rate)


async def episode(ep: Episode) -> dict[str, list[list[Sample]]]:
    proposer, solver = ep.agents["proposer"], ep.agents["solver"]
    n_problems, n_answers = (1, 1) if ep.evaluation else (PROBLEMS, ANSWERS)
    problems = await proposer.generate(proposer.encode(f"<bos> {ep.rng.randrange(10)} ?"), n=n_problems)
    posed = [(p, problem_of(p.response_text)) for p in problems]
    posed = [(p, digits) for p, digits in posed if digits]
    answers = await asyncio.gather(*(
        solver.generate(solver.encode(" ".join(["<bos>", *digits, "="])), n=n_answers) for _, digits in posed))
    for (p, digits), group in zip(posed, answers):
        for a in group:
            a.reward = copy_score(Prompt(index=ep.index, input_ids=[], label=digits), a)
        p.reward = proposer_reward(sum(a.reward == 1.0 for a in group) / len(group))
        ep.log("problem_len", len(digits))
    ep.log("posed", len(posed) / len(problems))
    if ep.evaluation:  # the solver alone, on a problem the proposer did not choose
        fixed = "".join(str(ep.rng.randrange(10)) for _ in range(1 + (-ep.index - 1) % MAX_DIGITS))
        (a,) = await solver.generate(solver.encode(" ".join(["<bos>", *fixed, "="])), n=1)
        ep.log("solver_fixed", copy_score(Prompt(index=ep.index, input_ids=[], label=fixed), a))
    return {"proposer": [problems], "solver": list(answers)}


def make_task(*, seed: int, eval_num_prompts: int) -> Task:
    """The shared vocabulary; the episodes make their own prompts."""
    tok = word_tokenizer([str(d) for d in range(10)] + ["=", "?"])
    return Task(tokenizer=tok, train_prompts=[], eval_prompts=[], reward_path="", stop_token_ids=[tok.eos_token_id])


RECIPE = Recipe(
    name="coevolve",
    description="a proposer of digit strings rewarded for hard-but-solvable ones and a solver copying them",
    defaults={"eval": {"eval_interval": 200}, "async": {"stall_timeout": 300.0}},
    make_task=make_task,
    agents={
        "proposer": {"lr": 1e-3, "entropy_coef": 0.02, "max_staleness": 1, "n_samples_per_prompt": PROBLEMS,
                     "groups_per_step": 2, "groups_per_episode": 1, "rollout_max_response_len": MAX_DIGITS + 1,
                     "num_steps": 800},
        "solver": {"lr": 3e-4, "max_staleness": 1, "n_samples_per_prompt": ANSWERS, "groups_per_step": 8,
                   "groups_per_episode": PROBLEMS, "rollout_max_response_len": MAX_DIGITS + 1, "num_steps": 1600},
    },
    episodes={"episode_fn": "launchers.recipes.coevolve:episode", "eval_episodes": 16},
)
