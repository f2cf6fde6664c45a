"""Evaluator: scores the current policy on held-out prompts with its own sampling settings.

It shares the engines with the generator but not its admission: an evaluation never holds a
slot, so it never stalls training. Weight syncs may land during an evaluation (its requests are
resumed like any other); ``EvalResult.versions`` reports the span of versions that answered.

Held-out prompts come in named sets (``--eval-prompt-data NAME PATH ...``; a recipe's own set is
named ""). ``reward`` is the first set's mean (the run's headline figure); ``sets`` has every set's.
"""

from __future__ import annotations

import asyncio

import msgspec

from actors.generate_fn import Episodes
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.types import Prompt, Sample, Status
from runtime.core import trace
from runtime.core.errors import RunFailed


class EvalResult(msgspec.Struct):
    version: int  # learner version that asked for it
    reward: float  # mean over scored samples (failed samples count as 0)
    n: int
    failed: int
    min_token_version: int
    max_token_version: int
    wall_s: float
    sets: dict[str, float] = {}  # set name -> mean reward (failed samples count as 0)


EVAL_BATCH = 16


class Evaluator:
    """``prompts``: one unnamed set; ``sets``: named ones (give one or the other). With no prompt
    at all ``enabled`` is False and the scheduler does not evaluate."""

    def __init__(self, *, runner: SampleRunner, scorer: RewardScorer, n_samples: int = 1,
                 prompts: list[Prompt] | None = None, sets: dict[str, list[Prompt]] | None = None,
                 episodes: Episodes | None = None):
        if prompts is not None and sets is not None:
            raise ValueError("give prompts or sets, not both")
        self.sets = {k: v for k, v in (sets if sets is not None else {"": prompts or []}).items() if v}
        self.runner, self.scorer, self.n_samples = runner, scorer, n_samples
        self.episodes = episodes  # --custom-generate-function-path: each sample is an episode of it

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    async def evaluate(self, version: int) -> EvalResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        named = [(name, p) for name, prompts in self.sets.items() for p in prompts]
        # ids below 0 (the runner's eval marker), distinct across sets: they seed sampling
        pairs = [(p, Sample(group_id=-1 - j, index=i, prompt_ids=p.input_ids))
                 for j, (_, p) in enumerate(named) for i in range(self.n_samples)]
        with trace.span("evaluator", "eval", version=version):
            # rounds of EVAL_BATCH samples, like the generator's groups; they share calls (an
            # evaluation is only ever cancelled as a whole)
            samples = [s for _, s in pairs]
            if self.episodes is not None:
                await self._episodes(pairs, version)
            else:
                await asyncio.gather(*(self.runner.run_group(samples[i:i + EVAL_BATCH], share="eval")
                                       for i in range(0, len(samples), EVAL_BATCH)))
                if samples and all(s.status == Status.FAILED for s in samples):  # a reward of 0 would hide it
                    raise RunFailed(f"evaluation at version {version}: all {len(samples)} requests failed; "
                                    f"first error: {samples[0].failure}")
                await self.scorer.score_many([(p, s) for p, s in pairs if s.trainable])
        samples = [s for _, s in pairs]
        versions = [v for s in samples for v in s.token_versions] or [version]
        by_set: dict[str, list[float]] = {name: [] for name in self.sets}
        owners = [name for name, _ in named for _ in range(self.n_samples)]  # aligned with samples
        for s, name in zip(samples, owners):
            by_set[name].append(s.reward if s.trainable else 0.0)
        means = {name: sum(r) / len(r) for name, r in by_set.items()}
        return EvalResult(
            version=version, reward=next(iter(means.values())),
            n=len(samples), failed=sum(not s.trainable for s in samples),
            min_token_version=min(versions), max_token_version=max(versions), wall_s=loop.time() - t0,
            sets=means,
        )

    async def _episodes(self, pairs: list[tuple[Prompt, Sample]], version: int) -> None:
        assert self.episodes is not None
        episodes = self.episodes

        async def one(p: Prompt, s: Sample) -> None:
            if await episodes.run_group(p, [s], base_version=version) and s.trainable:
                await self.scorer.score_many([(p, s)])

        await asyncio.gather(*(one(p, s) for p, s in pairs))
