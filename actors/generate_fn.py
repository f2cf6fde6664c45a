"""The generate plug-point, ``--custom-generate-function-path module:function`` (Miles's flag):
a user's async function runs each sample as a multi-turn episode.

The signature::

    async def generate(conv: actors.conversation.Conversation) -> float | None

``conv`` is one sample's episode: ``conv.prompt`` (the task's prompt, with its ``text`` and
``label``), ``conv.sampling_params``, ``await conv.generate()`` (a policy turn on the engines),
``conv.append_text(...)`` / ``conv.append_messages([...])`` (environment turns, masked),
``await conv.call_tool(fn, ...)`` (bounded by --tool-timeout), and, for agent code written against
the OpenAI SDK, ``conv.base_url`` and ``conv.api_key`` (the run's ``/v1/chat/completions``, where
this key's requests are this episode's turns). It returns the episode's reward, or None to have
the run's reward function (--custom-rm-path or the recipe's) score the final transcript.
``launchers/recipes/calculator.py`` and ``examples/openai_agent.py`` are examples.

One mechanism for every kind of episode: the generator runs it on each sample of an admitted
group, and a multi-agent episode runs it through ``AgentHandle.generate(..., turns=fn)``; both
then train the group like any other. A sample whose function raises, times out (--episode-timeout),
hits a limit or returns something other than a finite number or None fails with the reason,
counted as ``episode_REASON`` (its group trains on its other samples, or is dropped as
``no_trainable_sample``: the ledger balances either way); the first of each kind is logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from actors.conversation import Conversation, EpisodeLimit, EpisodeLimits
from actors.rollout import SampleRunner
from buffers.types import Prompt, Sample, Status

log = logging.getLogger(__name__)

GenerateFn = Callable[[Conversation], Awaitable["float | None"]]


class Endpoint(Protocol):
    """Serves conversations to agent code over HTTP (``actors.chat_endpoint.ChatEndpoint``)."""

    def register(self, conv: Conversation) -> None: ...  # sets conv.base_url and conv.api_key
    def unregister(self, conv: Conversation) -> None: ...


class BadReturn(TypeError):
    pass


class Episodes:
    """Runs ``fn`` once per sample (module docstring)."""

    def __init__(self, fn: GenerateFn, *, runner: SampleRunner, tokenizer: Any, limits: EpisodeLimits,
                 endpoint: Endpoint | None = None):
        self.fn, self.runner, self.tokenizer, self.limits, self.endpoint = fn, runner, tokenizer, limits, endpoint
        self.name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)!s}"
        self.counters = runner.counters  # beside the runner's engine counts: one record of the rollout's faults

    async def run_group(self, prompt: Prompt, samples: Sequence[Sample], *, base_version: int) -> list[Sample]:
        """Every sample's episode, concurrently (a failed one, from a checkpoint, stays failed).
        Returns the samples whose function returned None: the reward function scores those."""
        todo = [s for s in samples if s.status != Status.FAILED]
        unscored = await asyncio.gather(*(self._one(prompt, s, base_version) for s in todo))
        return [s for s, u in zip(todo, unscored) if u]

    async def _one(self, prompt: Prompt, sample: Sample, base_version: int) -> bool:
        conv = Conversation(sample, prompt=prompt, runner=self.runner, tokenizer=self.tokenizer, limits=self.limits,
                            base_version=base_version, counters=self.counters)
        if self.endpoint is not None:
            self.endpoint.register(conv)
        try:
            async with asyncio.timeout(self.limits.episode_timeout_s):
                result = await self.fn(conv)
            conv.finish()
            reward = self._check(result)
        except asyncio.CancelledError:
            raise
        except EpisodeLimit as e:
            return self._fail(sample, e.reason, e)
        except TimeoutError as e:
            return self._fail(sample, "timeout", e, f"over --episode-timeout {self.limits.episode_timeout_s}s")
        except BadReturn as e:
            return self._fail(sample, "bad_return", e)
        except Exception as e:  # noqa: BLE001 - the user's episode failing is counted, not fatal
            if conv.ended is not None:  # the endpoint answered a limit, and the agent raised on it
                return self._fail(sample, conv.ended.reason, conv.ended)
            return self._fail(sample, "error", e)
        finally:
            if self.endpoint is not None:
                self.endpoint.unregister(conv)
        if reward is None:
            return True
        sample.reward = reward
        return False

    def _check(self, result: object) -> float | None:
        if result is None:
            return None
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise BadReturn(f"{self.name} returned {type(result).__name__} {result!r:.80}; it must return the "
                            "episode's reward (a float) or None (score with the reward function)")
        if not math.isfinite(result):
            raise BadReturn(f"{self.name} returned the reward {result!r}; it must be finite")
        return float(result)

    def _fail(self, sample: Sample, reason: str, e: BaseException, detail: str = "") -> bool:
        kind = f"episode_{reason}"
        self.counters[kind] += 1
        sample.fail(f"{kind}: {detail or e}")
        if self.counters[kind] in (1, 10, 100, 1000):
            log.warning("%s (%d so far) in %s: %s: %s", kind, self.counters[kind], self.name, type(e).__name__,
                        detail or e, exc_info=reason == "error" and self.counters[kind] == 1)
        return False
