"""The two producers and their evaluations, as the scheduler drives them.

``PromptFeed``: one agent, the generator admitting prompt groups (the recipe's or a file's) and
scoring them with the reward; ``HeldOut``: its held-out sets, evaluated at a version.
``EpisodeFeed``: several agents, the episode driver running a user's episode function;
``EpisodeEvals``: evaluation episodes (greedy, untrained).
"""

from __future__ import annotations

import collections
from typing import Any

import msgspec

from actors.chat_endpoint import ChatEndpoint
from actors.episode_driver import EpisodeDriver
from actors.evaluator import Evaluator
from actors.generator import Generator
from runtime.agents import Agent
from runtime.step_line import EvalReport


class PromptFeed:
    """``endpoint``: the OpenAI-compatible endpoint multi-turn agent code calls, while the run lasts."""

    def __init__(self, generator: Generator, endpoint: ChatEndpoint | None = None):
        self.generator, self.endpoint = generator, endpoint

    async def start(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.start()

    async def stop(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.stop()

    async def run(self) -> None:
        await self.generator.run()

    async def retire(self, name: str) -> None:
        """The one learner is done: the run ends (the generator is cancelled with it)."""

    def line(self) -> dict[str, Any]:
        stats = self.generator.stats()
        return {"generator/wait_frac": stats.wait_frac, "data/cursor": stats.cursor}

    def counters(self) -> dict[str, int]:
        """Reward failures, prompts dropped for their length, and the endpoint's (malformed calls, ...)."""
        out = collections.Counter(self.generator.scorer.failures)
        if self.generator.prompts_too_long:
            out["prompts_too_long"] += self.generator.prompts_too_long
        out.update(self.endpoint.counters if self.endpoint is not None else {})
        return dict(out)

    def dump(self) -> str:
        return f"generator: cursor {self.generator.cursor}, waiting on {self.generator.clock.waiting_on}"

    def summary(self) -> dict[str, Any]:
        """Over-provisioned groups' expiries, and what the mask rule carried, among the counters."""
        g = self.generator
        extra = collections.Counter(g.expired) + collections.Counter(g.filtered)
        if g.buffer.mask_stale:
            extra.update(carried=g.buffer.carried, masked_tokens=g.buffer.masked_tokens)
        return {"counters": dict(extra)}


class HeldOut:
    def __init__(self, evaluator: Evaluator, agent: Agent):
        self.evaluator, self.agent = evaluator, agent
        self.enabled = evaluator.enabled

    async def evaluate(self, step: int) -> EvalReport:
        r = await self.evaluator.evaluate(self.agent.version)
        line = {"eval/reward": r.reward, "eval/version": r.version, "eval/wall_s": r.wall_s}
        line |= {f"eval/{name}": v for name, v in r.sets.items() if name}  # --eval-prompt-data's sets
        return EvalReport(step=step, rewards={self.agent.name: r.reward}, line=line, record=msgspec.to_builtins(r),
                          text=f"at version {r.version}: reward {r.reward:.3f}")


class EpisodeFeed:
    def __init__(self, driver: EpisodeDriver):
        self.driver = driver

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def run(self) -> None:
        await self.driver.run()

    async def retire(self, name: str) -> None:
        await self.driver.retire(name)

    def line(self) -> dict[str, Any]:
        stats = self.driver.stats()
        return {"episodes/started": stats.started, "episodes/running": stats.running,
                "episodes/wait_frac": stats.wait_frac, **{f"episode/{k}": v for k, v in stats.figures.items()}}

    def counters(self) -> dict[str, int]:
        """Episode failures (``episode_errors``, ``episode_timeouts``, ...)."""
        out = {k: v for k, v in self.driver.counters.items() if k != "episodes_completed"}
        out.setdefault("episode_errors", 0)
        return out

    def dump(self) -> str:
        d = self.driver
        return (f"episodes: started {d.started}, running {d.in_flight}, waiting on {d.clock.waiting_on}, "
                f"training {sorted(d.training)}")

    def summary(self) -> dict[str, Any]:
        return {"episodes": {"started": self.driver.started, **self.driver.counters}, "counters": {}}


class EpisodeEvals:
    def __init__(self, driver: EpisodeDriver, episodes: int):
        self.driver, self.episodes = driver, episodes
        self.enabled = episodes > 0

    async def evaluate(self, step: int) -> EvalReport:
        ev = await self.driver.evaluate(self.episodes, step=step)
        line = {f"agent/{name}/eval/reward": r for name, r in ev.rewards.items()}
        line |= {f"eval/episode/{k}": v for k, v in ev.figures.items()}
        line |= {"eval/step": ev.step, "eval/errors": ev.errors, "eval/wall_s": ev.wall_s}
        text = ", ".join(f"{name} {r:.3f}" for name, r in ev.rewards.items())
        return EvalReport(step=step, rewards=dict(ev.rewards), line=line, record=msgspec.to_builtins(ev), text=text)
