"""The data model that flows through the loop: prompts in, scored groups of samples out.

Invariant carried by these types (DESIGN.md, invariant 1): every generated token records the policy
version of the weights that produced it and the engine's behavior logprob of it. A response is
built from *segments*, one per engine answer. An answer's tokens carry the versions the engine
reports per token (the embedded engine does, so a request frozen by an ``in_place`` pause across
an update is exact), or else the answer's single ``weight_version``, which is exact when the
broadcaster aborts in-flight requests before it swaps weights (``abort`` pause, needed for
SGLang). A sample whose generation spanned a weight update therefore carries several versions.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class Status(enum.StrEnum):
    """How a sample's generation ended."""

    PENDING = "pending"  # still being generated
    COMPLETED = "completed"  # the engine stopped on a stop token
    TRUNCATED = "truncated"  # hit ``max_new_tokens``
    ABORTED = "aborted"  # aborted and not resumed (only at shutdown)
    FAILED = "failed"  # engine error or reward failure: excluded from the loss, counted


class Prompt(msgspec.Struct, frozen=True):
    """One prompt of the task. ``index`` is its position in the prompt stream (the data cursor)."""

    index: int
    input_ids: list[int]
    label: str = ""  # what the reward function checks against
    text: str = ""
    metadata: dict[str, Any] = {}  # the prompt file's metadata column (--metadata-key), for the reward


class Timing(msgspec.Struct):
    """Wall-clock seconds (``time.monotonic``) of one sample's life."""

    submitted: float = 0.0
    generated: float = 0.0  # last token received
    scored: float = 0.0


class Turn(msgspec.Struct, array_like=True, frozen=True):
    """Where one turn of a multi-turn episode starts in ``Sample.response_ids``, and whose it is."""

    start: int  # offset of its first token in ``response_ids``
    env: bool  # True: tokens the environment inserted (tool output, a user turn): loss mask 0


class Sample(msgspec.Struct):
    """One response to a prompt. Per-token lists are aligned with ``response_ids``.

    A multi-turn episode (``actors.conversation``) is one sample too: ``response_ids`` holds the
    policy's turns (trained, each token with its version and behavior logprob) interleaved with
    the environment's (loss mask 0, logprob 0.0, dated with the version of the policy turn before
    them so no token is ever newer than the policy that trains on it); ``turns`` says where each
    turn starts. A single-turn sample has no ``turns``.
    """

    group_id: int
    index: int  # position within its group
    prompt_ids: list[int]
    response_ids: list[int] = msgspec.field(default_factory=list)
    loss_mask: list[int] = msgspec.field(default_factory=list)  # 1: the token is trained on
    token_versions: list[int] = msgspec.field(default_factory=list)  # policy version per token
    behavior_logprobs: list[float] = msgspec.field(default_factory=list)  # engine logprob per token
    response_text: str = ""
    reward: float = 0.0
    reward_components: dict[str, float] = {}  # a reward returning a dict (--reward-key): all its parts
    status: Status = Status.PENDING
    failure: str = ""  # why, when ``status`` is FAILED
    timing: Timing = msgspec.field(default_factory=Timing)
    n_segments: int = 0  # engine answers this response was built from (>1: it spanned an abort)
    turns: list[Turn] = msgspec.field(default_factory=list)  # multi-turn only: where each turn starts

    def add_segment(self, token_ids: list[int], logprobs: list[float], versions: int | list[int]) -> None:
        """Append one engine answer's tokens with the version that produced each (one int: all)."""
        if isinstance(versions, int):
            versions = [versions] * len(token_ids)
        if not len(token_ids) == len(logprobs) == len(versions):
            raise ValueError(f"{len(token_ids)} tokens, {len(logprobs)} logprobs, {len(versions)} versions")
        self.response_ids.extend(token_ids)
        self.behavior_logprobs.extend(logprobs)
        self.token_versions.extend(versions)
        self.loss_mask.extend([1] * len(token_ids))
        self.n_segments += 1

    def add_env(self, token_ids: list[int], version: int) -> None:
        """Append tokens the environment inserted: context for later turns, never trained."""
        self.response_ids.extend(token_ids)
        self.behavior_logprobs.extend([0.0] * len(token_ids))
        self.token_versions.extend([version] * len(token_ids))
        self.loss_mask.extend([0] * len(token_ids))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` response tokens (and the turns that start before them)."""
        for lst in (self.response_ids, self.behavior_logprobs, self.token_versions, self.loss_mask):
            del lst[n:]
        self.turns = [t for t in self.turns if t.start < n]

    def fail(self, reason: str) -> None:
        """Exclude this sample from training, keeping the reason."""
        self.status = Status.FAILED
        self.failure = reason
        self.loss_mask = [0] * len(self.response_ids)

    @property
    def trainable(self) -> bool:
        return self.status in (Status.COMPLETED, Status.TRUNCATED) and any(self.loss_mask)


class Group(msgspec.Struct):
    """The ``n_samples_per_prompt`` samples of one prompt, the unit of admission and training.

    ``admitted_version`` is the weight version served by every engine when the group was admitted,
    so every token of the group has a version >= it. ``deadline_version`` is the last learner
    version allowed to train on it (``admitted_version + max_staleness``); the buffer never hands
    it out later, which is what makes the staleness bound hold by construction. (Over-provisioned,
    the buffer may move it: later for a group whose tokens all came after admission, and, with
    ``--partial-expiry mask``, for a late group whose tokens past the bound it then masks.)
    """

    group_id: int
    prompt: Prompt
    samples: list[Sample]
    admitted_version: int
    deadline_version: int

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def n_trainable(self) -> int:
        return sum(s.trainable for s in self.samples)
