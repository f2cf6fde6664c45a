"""Group filters (Miles's ``--dynamic-sampling-filter-path``): decide, once a group is scored,
whether it is worth training on. A filter is ``fn(group) -> bool | FilterResult`` (or a
``(keep, reason)`` pair); a dropped group is recorded in the ledger as ``filter_<reason>`` and its
admission slot is freed, so the generator admits another in its place: batches stay full, and
since the slot goes back through the same admission rule the staleness bound holds as before.

``check_reward_nonzero_std`` is DAPO's dynamic sampling (Miles's built-in of the same name): a
group whose trainable samples all got the same reward has zero advantage everywhere under GRPO,
so it would only dilute the batch.
"""

from __future__ import annotations

from typing import Any

import msgspec

from buffers.types import Group


class FilterResult(msgspec.Struct, frozen=True):
    keep: bool
    reason: str = ""  # why it was dropped: the ledger's reason is ``filter_<reason>``


def as_result(verdict: Any) -> FilterResult:
    """A filter's answer in its accepted forms, checked (a wrong type raises TypeError)."""
    if isinstance(verdict, FilterResult):
        return verdict
    if isinstance(verdict, bool):
        return FilterResult(verdict)
    if isinstance(verdict, tuple) and len(verdict) == 2 and isinstance(verdict[0], bool):
        return FilterResult(verdict[0], str(verdict[1]))
    raise TypeError(f"a filter returns a bool, a (keep, reason) pair or a FilterResult, got {verdict!r}")


def check_reward_nonzero_std(group: Group) -> FilterResult:
    rewards = [s.reward for s in group.samples if s.trainable]
    if len(set(rewards)) > 1:
        return FilterResult(True)
    return FilterResult(False, "zero_std")
