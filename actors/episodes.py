"""Episodes across agents: what a user's episode function receives and returns.

An episode is a user coroutine ``episode(ep: Episode) -> {agent name: [group, ...]}``, loaded from
a ``module:function`` path. A group is the list of samples one ``generate`` call returned, each
with ``reward`` set by the episode. The episode sees every agent through an ``AgentHandle``:
``await ep.agents["solver"].generate(prompt_ids, n=4)`` samples ``n`` answers on that agent's own
engines, every token stamped with the version of *that agent's* weights that produced it and its
behavior logprob. Agents see each other's outputs because the episode passes them along. With ``turns=fn`` each of
the ``n`` samples is a multi-turn episode of ``fn`` (``actors.generate_fn``: the same plug-point
as ``--custom-generate-function-path``, tools and limits included), its reward set by ``fn``.

A trained ``generate`` call takes one of the slots the driver reserved for the episode in that
agent's buffer (``actors.episode_driver``), so the group's tokens are no older than the version
the agent served at admission: its staleness is bounded against its own version. A frozen agent,
one whose learner has finished, or any agent in an evaluation episode is served without a slot,
and its groups are never trained. Returning a group is what sends it to training; a slot the
episode leaves unused or does not return is dropped with a reason.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from actors.conversation import EpisodeLimits
from actors.generate_fn import Episodes, GenerateFn
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer, Ticket
from buffers.types import Prompt, Sample
from runtime.core.ledger import Ledger, State

Outcome = Mapping[str, Sequence[Sequence[Sample]]]  # agent name -> its groups, rewards set
EpisodeFn = Callable[["Episode"], Awaitable[Outcome]]


class Served(Protocol):
    """What the driver needs of an agent (``runtime.agents.Agent`` is one)."""

    name: str
    ledger: Ledger
    buffer: StalenessBuffer | None  # None: frozen, never trained
    runner: SampleRunner  # training sampling
    eval_runner: SampleRunner  # evaluation sampling (greedy by default)
    tokenizer: Any
    n_samples: int  # generate()'s default n
    groups_per_episode: int

    @property
    def served_version(self) -> int: ...


class EpisodeError(RuntimeError):
    """The episode broke the contract (module docstring); counted like any episode failure."""


class AgentHandle:
    """One agent as one episode sees it: its generation API and its tokenizer."""

    def __init__(self, agent: Served, tickets: Sequence[Ticket] | None, *, evaluation: bool,
                 untracked: Callable[[], int], overflow_served: bool = False):
        self.agent = agent
        self.evaluation = evaluation
        # a resumed episode holds only the slots still live at the checkpoint: groups past them are
        # served, not trained (their slots ended before the checkpoint)
        self._overflow_served = overflow_served
        # the slots reserved for this episode; None: the agent is served here, not trained
        self._tickets = None if tickets is None else collections.deque(tickets)
        self._untracked = untracked  # fresh negative group ids for groups that are never trained
        self.generated: dict[int, tuple[Ticket, list[int]]] = {}  # group id -> (slot, prompt ids)

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def version(self) -> int:
        """The weight version the agent's engines serve now."""
        return self.agent.served_version

    @property
    def tokenizer(self) -> Any:
        return self.agent.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.agent.tokenizer.encode(text)

    async def generate(self, prompt_ids: Sequence[int], n: int | None = None, *, turns: GenerateFn | None = None,
                       limits: EpisodeLimits | None = None) -> list[Sample]:
        """``n`` (default: the agent's ``n_samples_per_prompt``) answers to one prompt: one group.
        Each sample has ``response_ids``, ``response_text``, ``behavior_logprobs`` and
        ``token_versions``; set its ``reward`` and return the group from the episode to train on it.
        ``turns``: each answer is a multi-turn episode of this function (module docstring), under
        ``limits`` (default: one turn's bound is the agent's response length)."""
        n = self.agent.n_samples if n is None else n
        if n < 1:
            raise EpisodeError(f"agent {self.name}: generate needs n >= 1, got {n}")
        ticket = None
        if self._tickets is not None and not (self._overflow_served and not self._tickets):
            if not self._tickets:
                raise EpisodeError(f"agent {self.name}: more than {self.agent.groups_per_episode} trained groups "
                                   "in one episode (groups_per_episode)")
            ticket = self._tickets.popleft()
        gid = ticket.group_id if ticket is not None else self._untracked()
        samples = [Sample(group_id=gid, index=i, prompt_ids=list(prompt_ids)) for i in range(n)]
        if ticket is not None:
            self.agent.ledger.advance(gid, State.GENERATING)
            self.generated[gid] = (ticket, list(prompt_ids))
        runner = self.agent.eval_runner if self.evaluation else self.agent.runner
        if turns is None:
            await runner.run_group(samples)
            return samples
        limits = limits or EpisodeLimits(turn_max_tokens=runner.max_new_tokens)
        episodes = Episodes(turns, runner=runner, tokenizer=self.agent.tokenizer, limits=limits)
        await episodes.run_group(Prompt(index=-1, input_ids=list(prompt_ids)), samples, base_version=self.version)
        return samples

    def unused(self) -> list[Ticket]:
        return list(self._tickets or ())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Episode:
    """What the episode function receives."""

    agents: dict[str, AgentHandle]  # by agent name
    index: int  # training episodes count 0, 1, ...; evaluation episodes are -1, -2, ... (the same each time)
    evaluation: bool  # evaluation: greedy sampling, nothing is trained
    rng: random.Random  # seeded by (seed, index): an episode's own choices are reproducible
    figures: dict[str, float] = dataclasses.field(default_factory=dict)

    def log(self, key: str, value: float) -> None:
        """A figure of this episode (say, its problem's length): training episodes' figures are
        averaged onto the next metrics line as ``episode/KEY``, evaluation episodes' onto the eval's."""
        self.figures[key] = float(value)
