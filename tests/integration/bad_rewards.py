"""Reward functions that misbehave on purpose, loaded by tests through --custom-rm-path."""

import threading

from launchers.recipes.copy_digits import reward as copy_reward

_never = threading.Event()


def raises_or_hangs(prompt, sample):
    """Raises on sample 0 of every group and hangs forever on sample 1 of every third group."""
    if sample.index == 0:
        raise RuntimeError("reward server unavailable")
    if sample.index == 1 and sample.group_id % 3 == 0:
        _never.wait()
    return copy_reward(prompt, sample)
