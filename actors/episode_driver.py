"""The episode driver: admits episodes under every training agent's own bound, runs them, and hands
each agent its groups (the episode API is ``actors.episodes``).

Lifecycle of one episode (a named task owned by the driver's TaskGroup):
    reserve, for every agent still training, ``groups_per_episode`` slots in its own buffer, all
    at once (``reserve_many``), agent after agent (waits: each agent's admission rule)
    -> run the episode function (bounded by ``timeout_s``); each trained ``generate`` takes a slot
    -> each returned group goes to its agent's buffer (ledger SCORED -> BUFFERED); a slot the
       episode did not use or did not return is dropped with a reason (``unused``, ``not_returned``)
An episode that raises, times out or returns something malformed is counted (``episode_errors``,
``episode_timeouts``), its slots are dropped (``episode_error``), and the run goes on: every slot
ends exactly once in its agent's ledger. ``retire(name)`` (the agent's learner is done) closes its
buffer; later episodes serve it without slots.

No deadlock: the driver holds the slots of at most one episode that is not running yet, never part
of one agent's share, and a running episode never waits on admission. So every group an agent's
learner waits for is ready or belongs to a running episode, provided each agent's buffer can hold
one step's groups beside one episode's share less one (``runtime.agents`` checks it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence

import msgspec

from actors.episodes import AgentHandle, Episode, EpisodeError, EpisodeFn, Outcome, Served
from buffers.buffer import Closed, Ticket
from buffers.types import Group, Prompt, Sample
from runtime.core import trace
from runtime.core.ledger import State
from runtime.core.waits import WaitClock

log = logging.getLogger(__name__)


class EpisodeEval(msgspec.Struct):
    """One evaluation: ``episodes`` episodes in evaluation mode, each agent's mean reward."""

    step: int  # learner steps (all agents) when it was asked for
    versions: dict[str, int]  # each agent's served version at the start
    rewards: dict[str, float]  # mean over the agent's returned samples (failed ones count 0)
    figures: dict[str, float]  # mean of each figure the episodes logged (``Episode.log``)
    episodes: int
    errors: int
    wall_s: float


class LiveSlot(msgspec.Struct):
    """A slot of a running episode, in a checkpoint: resumed by running episode ``episode`` again."""

    group_id: int
    admitted_version: int
    deadline_version: int
    episode: int


class EpisodeStats(msgspec.Struct):
    """The episode driver's figures on a metrics line (``episodes/*``, ``episode/*``)."""

    started: int  # episodes admitted so far
    running: int  # episodes in flight
    wait_frac: float  # share of the time since the last stats() with admission closed and none running
    figures: dict[str, float]  # the mean of each figure training episodes logged since the last stats()


class EpisodeDriver:
    def __init__(self, *, agents: Sequence[Served], episode_fn: EpisodeFn, timeout_s: float, seed: int = 0,
                 started: int = 0, resume: Mapping[str, Sequence[LiveSlot]] | None = None):
        """``started``, ``resume``: a checkpoint's episode count and each agent's live slots."""
        self.agents = {a.name: a for a in agents}
        self.episode_fn = episode_fn
        self.timeout_s = timeout_s
        self.seed = seed
        self.training = {a.name for a in agents if a.buffer is not None}  # reserved for at admission
        self.started = started
        self._live: dict[int, dict[str, list[Ticket]]] = {}  # running episode -> its slots
        self._resume: dict[int, dict[str, list[Ticket]]] = collections.defaultdict(dict)
        for name, slots in (resume or {}).items():
            for s in sorted(slots, key=lambda s: s.group_id):
                ticket = Ticket(s.group_id, s.admitted_version, s.deadline_version)
                self._resume[s.episode].setdefault(name, []).append(ticket)
        # an episode still in admission at a checkpoint had not counted as started there
        self.started = max([started, *(index + 1 for index in self._resume)])
        self.in_flight = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self._figures: dict[str, list[float]] = collections.defaultdict(list)  # since the last ``stats()``
        # time rollout is idle: admission closed and no episode running (a closed admission
        # while episodes run is not lost time: the engines are busy)
        self.clock = WaitClock("episodes")
        self._blocked = self._idle = False
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Admit and start episodes until cancelled. A crashing episode *task* is a bug of the
        driver (episode failures are caught and counted): it ends the run loudly."""
        async with asyncio.TaskGroup() as episodes:
            for index, tickets in sorted(self._resume.items()):  # a checkpoint's running episodes, again
                self._add_running(1)
                episodes.create_task(self._run(index, tickets, resumed=True), name=f"episode-{index}-resumed")
            self._resume.clear()
            while True:
                # slots held while admission waits on another agent are live too: a checkpoint
                # taken then records them under the episode that will run them
                index, tickets = self.started, {}
                self._live[index] = tickets
                await self._admit(tickets)
                self.started += 1
                self._add_running(1)
                episodes.create_task(self._run(index, tickets), name=f"episode-{index}")

    def live_slots(self, name: str) -> list[LiveSlot]:
        """``name``'s slots in running episodes that are not yet buffered, for its checkpoint
        (synchronous: one instant of the event loop)."""
        ledger = self.agents[name].ledger
        return [LiveSlot(t.group_id, t.admitted_version, t.deadline_version, index)
                for index, tickets in self._live.items() for t in tickets.get(name, ())
                if ledger.is_live(t.group_id) and ledger.state(t.group_id) < State.BUFFERED]

    async def retire(self, name: str) -> None:
        """``name``'s learner is done: later episodes serve it without slots, and an admission
        waiting on its buffer moves on."""
        self.training.discard(name)
        buffer = self.agents[name].buffer
        if buffer is not None:
            await buffer.close()

    async def _admit(self, tickets: dict[str, list[Ticket]]) -> None:
        """Fill ``tickets`` with every training agent's share, agent after agent."""
        self._blocked = True
        self._sync_idle()
        try:
            while not self.training:  # nothing left to train: parked until the scheduler ends the run
                await asyncio.get_running_loop().create_future()
            for name in [n for n in self.agents if n in self.training]:  # a fixed order: reproducible
                a = self.agents[name]
                assert a.buffer is not None
                try:
                    with trace.span("episodes", f"wait admission {name}"):
                        tickets[name] = await a.buffer.reserve_many(a.ledger.admit, a.groups_per_episode)
                except Closed:
                    self.training.discard(name)
        finally:
            self._blocked = False
            self._sync_idle()

    def _add_running(self, n: int) -> None:
        self.in_flight += n
        self._sync_idle()

    def _sync_idle(self) -> None:
        idle = self._blocked and self.in_flight == 0
        if idle and not self._idle:
            self.clock.enter("admission (no episode running)")
        elif self._idle and not idle:
            self.clock.exit()
        self._idle = idle

    async def _run(self, index: int, tickets: dict[str, list[Ticket]], *, resumed: bool = False) -> None:
        handles = self._handles(tickets, evaluation=False, resumed=resumed)
        self._live[index] = tickets
        try:
            outcome, figures = await self._call(index, handles, evaluation=False)
            returned = self._collect(handles, outcome)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's episode failing is counted, not fatal
            await self._drop_all(handles, tickets, "episode_error")
            self._live.pop(index, None)
            self._count("episode_timeouts" if isinstance(e, TimeoutError) else "episode_errors", e)
            return
        finally:
            self._add_running(-1)
        try:
            await self._deliver(index, handles, returned)
        finally:
            self._live.pop(index, None)
        self.counters["episodes_completed"] += 1
        for key, value in figures.items():
            self._figures[key].append(value)

    def stats(self) -> EpisodeStats:
        """Figures since the last call (the wait share and the episodes' figures are laps)."""
        return EpisodeStats(started=self.started, running=self.in_flight, wait_frac=self.clock.lap(),
                            figures=self._take_figures())

    def _take_figures(self) -> dict[str, float]:
        """The mean of each figure training episodes logged since the last call."""
        out = {key: sum(vs) / len(vs) for key, vs in self._figures.items() if vs}
        self._figures.clear()
        return out

    async def evaluate(self, n: int, *, step: int) -> EpisodeEval:
        """``n`` evaluation episodes (greedy, untrained), concurrently; each agent's mean reward."""
        t0 = time.monotonic()
        versions = {name: a.served_version for name, a in self.agents.items()}
        totals = {name: [0.0, 0] for name in self.agents}
        figures: dict[str, list[float]] = collections.defaultdict(list)
        errors = 0

        async def one(i: int) -> None:
            nonlocal errors
            handles = self._handles({}, evaluation=True)
            try:
                outcome, logged = await self._call(-1 - i, handles, evaluation=True)
                for key, value in logged.items():
                    figures[key].append(value)
                for name, groups in outcome.items():
                    for s in (s for g in groups for s in g):
                        totals[name][0] += _reward(s) if s.trainable else 0.0
                        totals[name][1] += 1
            except Exception as e:  # noqa: BLE001 - counted like a training episode's failure
                errors += 1
                self._count("eval_episode_errors", e)

        with trace.span("evaluator", "episodes", n=n):
            await asyncio.gather(*(one(i) for i in range(n)))
        rewards = {name: total / count for name, (total, count) in totals.items() if count}
        return EpisodeEval(step=step, versions=versions, rewards=rewards,
                           figures={key: sum(vs) / len(vs) for key, vs in figures.items()}, episodes=n,
                           errors=errors, wall_s=time.monotonic() - t0)

    # -- one episode -----------------------------------------------------------------------------
    def _handles(self, tickets: dict[str, list[Ticket]], *, evaluation: bool, resumed: bool = False
                 ) -> dict[str, AgentHandle]:
        def untracked() -> int:
            return -next(self._ids)

        return {name: AgentHandle(a, tickets.get(name), evaluation=evaluation, untracked=untracked,
                                  overflow_served=resumed) for name, a in self.agents.items()}

    async def _call(self, index: int, handles: dict[str, AgentHandle], *, evaluation: bool
                    ) -> tuple[Outcome, dict[str, float]]:
        ep = Episode(agents=handles, index=index, evaluation=evaluation, rng=random.Random(f"{self.seed}:{index}"))
        with trace.lane("episodes") as lane, lane.span("episode", index=index, evaluation=evaluation):
            async with asyncio.timeout(self.timeout_s):
                outcome = await self.episode_fn(ep)
        if not isinstance(outcome, Mapping):
            raise EpisodeError(f"the episode function returned {type(outcome).__name__}, not {{agent: groups}}")
        unknown = set(outcome) - set(self.agents)
        if unknown:
            raise EpisodeError(f"the episode returned groups for unknown agents {sorted(unknown)}")
        return outcome, ep.figures

    def _collect(self, handles: dict[str, AgentHandle], outcome: Outcome
                 ) -> list[tuple[Served, Ticket, list[int], list[Sample]]]:
        """The trainable groups of ``outcome`` with their slots; raises ``EpisodeError`` (before
        anything is delivered) on a group that is not one this episode generated."""
        out, seen = [], set()
        for name, groups in outcome.items():
            handle = handles[name]
            for group in groups:
                samples = list(group)
                gids = {s.group_id for s in samples}
                if len(gids) != 1:
                    raise EpisodeError(f"agent {name}: a returned group mixes samples of groups {sorted(gids)}")
                (gid,) = gids
                if gid < 0:  # frozen, retired or evaluation: served, never trained
                    continue
                if gid not in handle.generated or (name, gid) in seen:
                    raise EpisodeError(f"agent {name}: returned group {gid} was not generated by this episode "
                                       "(or was returned twice)")
                seen.add((name, gid))
                ticket, prompt_ids = handle.generated[gid]
                out.append((handle.agent, ticket, prompt_ids, samples))
        return out

    async def _deliver(self, index: int, handles: dict[str, AgentHandle],
                       returned: list[tuple[Served, Ticket, list[int], list[Sample]]]) -> None:
        for agent, ticket, prompt_ids, samples in returned:
            handles[agent.name].generated.pop(ticket.group_id)
            for s in samples:
                if s.trainable and not math.isfinite(_reward(s)):
                    s.fail(f"reward is {s.reward!r}")
                    self.counters["reward_error"] += 1
            gid = ticket.group_id
            agent.ledger.advance(gid, State.SCORED)
            group = Group(group_id=gid, prompt=Prompt(index=index, input_ids=prompt_ids), samples=samples,
                          admitted_version=ticket.admitted_version, deadline_version=ticket.deadline_version)
            if group.n_trainable == 0:
                await self._drop(agent, gid, "no_trainable_sample")
                continue
            agent.ledger.advance(gid, State.BUFFERED)
            assert agent.buffer is not None
            await agent.buffer.put(group)
        for h in handles.values():
            for gid in list(h.generated):
                await self._drop(h.agent, gid, "not_returned")
            for t in h.unused():
                await self._drop(h.agent, t.group_id, "unused")

    async def _drop_all(self, handles: dict[str, AgentHandle], tickets: dict[str, list[Ticket]],
                        reason: str) -> None:
        for name, ts in tickets.items():
            for t in ts:
                await self._drop(handles[name].agent, t.group_id, reason)

    async def _drop(self, agent: Served, gid: int, reason: str) -> None:
        agent.ledger.dropped(gid, reason)
        assert agent.buffer is not None
        await agent.buffer.cancel(gid)

    def _count(self, kind: str, e: BaseException) -> None:
        self.counters[kind] += 1
        if self.counters[kind] in (1, 10, 100, 1000):
            log.warning("%s (%d so far): %s: %s", kind, self.counters[kind], type(e).__name__, e,
                        exc_info=self.counters[kind] == 1)


def _reward(s: Sample) -> float:
    try:
        return float(s.reward)
    except (TypeError, ValueError):
        return math.nan
