"""One multi-turn episode of one sample: the handle a generate function drives, turn by turn.

Token-in/token-out: the transcript is ``sample.prompt_ids + sample.response_ids`` and nothing in
it is ever re-tokenised. A policy turn (``generate``) sends the whole transcript to the engines
and appends exactly the tokens they returned, each with its version and behavior logprob (loss
mask 1), resumed across weight-update aborts and engine failover like any sample
(``actors.rollout``). An environment turn (``append``, ``append_text``, ``append_messages``)
tokenises only the new text (for messages: the chat template of the new messages alone) and
appends it with loss mask 0. So what the learner trains on is the token sequence the engine saw.

Limits (``EpisodeLimits``): a policy turn beyond ``max_turns``, a transcript that would pass
``max_context_len`` tokens, and a tool call (``call_tool``) past ``tool_timeout_s`` raise
``EpisodeLimit`` into the generate function; one that lets it through fails its sample with the
reason (``actors.generate_fn`` counts it). Each policy turn generates at most ``turn_max_tokens``.

Resume (a checkpoint holds live samples with their ``turns``): the generate function is run again
from the start and *replays* the recorded transcript: ``generate`` returns a recorded policy turn
without calling the engines (continuing it if it was cut mid-turn), ``append`` checks that the
environment inserts the tokens it inserted before. The first difference (a non-deterministic
environment) cuts the transcript there and the episode goes on live from that point (counted:
``replay_diverged``). No token is generated twice and none is lost.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from actors.rollout import SampleRunner
from buffers.types import Prompt, Sample, Status, Turn
from policies import chat


class EpisodeLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_turns: int = 8  # policy turns per episode
    turn_max_tokens: int = 64  # tokens one policy turn may generate
    max_context_len: int = 0  # prompt + every turn, in tokens (the context bound); 0: no bound but the turns'
    tool_timeout_s: float = 10.0  # one ``call_tool``
    episode_timeout_s: float = 120.0  # the whole generate function (``actors.generate_fn``)


class EpisodeLimit(RuntimeError):
    """A limit ended the episode; ``reason`` is the counter it goes under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ToolTimeout(EpisodeLimit):
    def __init__(self, detail: str):
        super().__init__("tool_timeout", detail)


class EngineFailed(EpisodeLimit):
    def __init__(self, detail: str):
        super().__init__("engine_failed", detail)


class Reply(msgspec.Struct, frozen=True):
    """One policy turn: the tokens the engines returned and their text."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (the turn's or the context's bound)


class Conversation:
    """The handle a generate function receives (module docstring). Attributes it may read:
    ``prompt`` (the task's prompt: ``text``, ``label``), ``sample`` (the transcript so far),
    ``sampling_params``, ``tokenizer``, ``limits``, and, when the run serves the OpenAI-compatible
    endpoint, ``base_url`` and ``api_key`` (this episode's: every request made with it is a turn
    of this episode)."""

    def __init__(self, sample: Sample, *, prompt: Prompt, runner: SampleRunner, tokenizer: Any,
                 limits: EpisodeLimits, base_version: int, counters: collections.Counter[str] | None = None):
        self.sample, self.prompt, self.runner, self.tokenizer, self.limits = sample, prompt, runner, tokenizer, limits
        self.base_version = base_version  # served at admission: dates environment tokens before any policy turn
        self.counters = counters if counters is not None else collections.Counter()
        self.base_url = self.api_key = ""  # set by the endpoint that serves this episode
        self.messages_seen = 0  # OpenAI messages already in the transcript (the endpoint's bookkeeping)
        self.ended: EpisodeLimit | None = None  # a limit the endpoint answered with: the episode's end
        self._replay = 0  # index of the next recorded turn to replay
        self._recorded = len(sample.turns)  # turns recorded before a resume; replay ends there

    # -- what a generate function reads ----------------------------------------------------------
    @property
    def sampling_params(self) -> dict[str, Any]:
        return dict(self.runner.sampling_params, max_new_tokens=self.limits.turn_max_tokens)

    @property
    def n_turns(self) -> int:
        """Policy turns so far."""
        return sum(not t.env for t in self.sample.turns)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.runner.sampling_params.get("stop_token_ids") or [])

    # -- policy turns ----------------------------------------------------------------------------
    async def generate(self, max_new_tokens: int | None = None) -> Reply:
        """One policy turn on the engines: the whole transcript in, the new tokens out (trained)."""
        span = self._replay_policy_turn()
        if span is not None and span.complete:
            return self._reply(span.start, span.end)
        if span is None:
            if self.n_turns >= self.limits.max_turns:
                raise EpisodeLimit("max_turns", f"a turn beyond max_turns={self.limits.max_turns}")
            start = len(self.sample.response_ids)
            self._check_room(1)
            self.sample.turns.append(Turn(start, env=False))
        else:  # the checkpoint cut this turn: it goes on from its tokens so far
            start = span.start
        budget = min(max_new_tokens or self.limits.turn_max_tokens, self.limits.turn_max_tokens)
        limit = start + budget
        if self.limits.max_context_len:
            limit = min(limit, self.limits.max_context_len - len(self.sample.prompt_ids))
        self.sample.status = Status.PENDING
        await self.runner.run_group([self.sample], limit=limit)
        if self.sample.status == Status.FAILED:
            raise EngineFailed(self.sample.failure)
        return self._reply(start, len(self.sample.response_ids))

    def _reply(self, start: int, end: int) -> Reply:
        ids = self.sample.response_ids[start:end]
        finish = "stop" if ids and ids[-1] in self.stop_token_ids else "length"
        return Reply(ids, self.runner.decode(ids), finish)

    # -- environment turns -----------------------------------------------------------------------
    def append(self, token_ids: Sequence[int]) -> None:
        """Tokens the environment inserts (tool output, a user turn): context, never trained."""
        ids = [int(t) for t in token_ids]
        if self._replay_env_turn(ids):
            return
        self._check_room(len(ids))
        self.sample.turns.append(Turn(len(self.sample.response_ids), env=True))
        versions = self.sample.token_versions
        self.sample.add_env(ids, versions[-1] if versions else self.base_version)

    def append_text(self, text: str) -> None:
        """``text`` tokenised on its own (no special tokens added) and appended."""
        self.append(self.tokenizer.encode(text, add_special_tokens=False))

    def append_messages(self, messages: Sequence[dict[str, Any]]) -> None:
        """New chat messages (say, ``{"role": "tool", "content": ...}``) through the chat template,
        rendered alone and appended, ending with the assistant's generation prompt. After a turn the
        engine ended on its stop token, what the template puts after that token (ChatML's newline)
        is part of this text; after a turn cut by a bound, the end-of-turn text is added first."""
        ended = bool(self.sample.response_ids) and self.sample.response_ids[-1] in self.stop_token_ids
        self.append_text(chat.turn_continuation(self.tokenizer, chat.check_messages(list(messages)),
                                                after_turn_end=ended or not self.sample.response_ids))

    # -- tools -----------------------------------------------------------------------------------
    async def call_tool(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` bounded by ``tool_timeout_s`` (a plain function runs on a thread,
        so a hung one cannot stall the loop); past it, ``ToolTimeout`` (counted: ``tool_timeouts``)."""
        try:
            async with asyncio.timeout(self.limits.tool_timeout_s):
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args, **kwargs)
                return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))
        except TimeoutError:
            self.counters["tool_timeouts"] += 1
            name = getattr(fn, "__name__", repr(fn))
            raise ToolTimeout(f"tool {name} took over {self.limits.tool_timeout_s}s") from None

    # -- bounds ----------------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        bound = self.limits.max_context_len
        used = len(self.sample.prompt_ids) + len(self.sample.response_ids)
        if bound and used + n > bound:
            raise EpisodeLimit("max_context_len", f"{used} + {n} tokens exceed max_context_len={bound}")

    # -- replay after a resume (module docstring) -------------------------------------------------
    def _replay_policy_turn(self) -> _Span | None:
        turns = self.sample.turns
        if self._replay >= self._recorded:
            return None
        turn = turns[self._replay]
        if turn.env:  # the function generates where it inserted before
            self._diverge()
            return None
        self._replay += 1
        if self._replay < self._recorded:  # a later turn exists: this one is complete
            return _Span(turn.start, turns[self._replay].start, complete=True)
        # the last recorded turn: complete unless the checkpoint caught it generating
        return _Span(turn.start, len(self.sample.response_ids), complete=self.sample.status != Status.PENDING)

    def _replay_env_turn(self, ids: list[int]) -> bool:
        turns = self.sample.turns
        if self._replay >= self._recorded:
            return False
        turn = turns[self._replay]
        end = turns[self._replay + 1].start if self._replay + 1 < self._recorded else len(self.sample.response_ids)
        if turn.env and self.sample.response_ids[turn.start:end] == ids:
            self._replay += 1
            return True
        self._diverge()
        return False

    def _diverge(self) -> None:
        """Cut the transcript at the next recorded turn: from here on the episode runs live."""
        self.sample.truncate(self.sample.turns[self._replay].start)
        self._replay = self._recorded = len(self.sample.turns)
        self.counters["replay_diverged"] += 1

    def finish(self) -> None:
        """The function returned: recorded turns it did not replay are cut."""
        if self._replay < self._recorded:
            self._diverge()
        if self.sample.status == Status.PENDING:
            self.sample.status = Status.COMPLETED


class _Span(msgspec.Struct, frozen=True):
    """A recorded policy turn being replayed."""

    start: int
    end: int
    complete: bool  # False: cut mid-turn by the checkpoint
