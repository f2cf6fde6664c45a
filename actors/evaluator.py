"""Evaluator: scores the current policy on held-out prompts with its own sampling settings.

It shares the engines with the generator but not its admission: an evaluation never holds a
slot, so it never stalls training. Weight syncs may land during an evaluation (its requests are
resumed like any other); ``EvalResult.versions`` reports the span of versions that answered.
"""

from __future__ import annotations

import asyncio

import msgspec

from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.types import Prompt, Sample
from runtime.core import trace


class EvalResult(msgspec.Struct):
    version: int  # learner version that asked for it
    reward: float  # mean over scored samples (failed samples count as 0)
    n: int
    failed: int
    min_token_version: int
    max_token_version: int
    wall_s: float


EVAL_BATCH = 16


class Evaluator:
    def __init__(self, *, prompts: list[Prompt], runner: SampleRunner, scorer: RewardScorer, n_samples: int = 1):
        self.prompts, self.runner, self.scorer, self.n_samples = prompts, runner, scorer, n_samples

    async def evaluate(self, version: int) -> EvalResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pairs = [(p, Sample(group_id=-1 - p.index, index=i, prompt_ids=p.input_ids))
                 for p in self.prompts for i in range(self.n_samples)]
        with trace.span("evaluator", "eval", version=version):
            # rounds of EVAL_BATCH samples, like the generator's groups; they share calls (an
            # evaluation is only ever cancelled as a whole)
            samples = [s for _, s in pairs]
            await asyncio.gather(*(self.runner.run_group(samples[i:i + EVAL_BATCH], share="eval")
                                   for i in range(0, len(samples), EVAL_BATCH)))
            await self.scorer.score_many([(p, s) for p, s in pairs if s.trainable])
        samples = [s for _, s in pairs]
        versions = [v for s in samples for v in s.token_versions] or [version]
        return EvalResult(
            version=version,
            reward=sum(s.reward if s.trainable else 0.0 for s in samples) / len(samples),
            n=len(samples), failed=sum(not s.trainable for s in samples),
            min_token_version=min(versions), max_token_version=max(versions), wall_s=loop.time() - t0,
        )
