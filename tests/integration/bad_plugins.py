"""Plug-ins that misbehave on purpose (rewards, metrics sinks), loaded through their flags by
tests/integration/test_bad_inputs.py: each is what a user's buggy code does, not a fake of ours."""

import threading
import time

from launchers.recipes.copy_digits import reward as copy_reward

_never = threading.Event()


async def blocks_the_loop(prompt, sample):
    """An ``async def`` that calls a blocking function: it never yields to its event loop."""
    time.sleep(3600)  # noqa: ASYNC251 - the bug this plug-in stands for
    return 1.0


def always_raises(prompt, sample):
    raise ConnectionError("reward server unavailable")


def always_hangs(prompt, sample):
    _never.wait()


def huge_or_not_finite(prompt, sample):
    """In training groups, sample 0: 1e300 (its square overflows); 1: nan; 2: -inf; the other
    samples, and evaluations, score as usual."""
    bad = {0: 1e300, 1: float("nan"), 2: float("-inf")} if sample.group_id >= 0 else {}
    return bad.get(sample.index, copy_reward(prompt, sample))


class _Sink:
    def __init__(self, write):
        self._write = write

    def write(self, step, metrics):
        self._write()

    def close(self):
        pass


def sink_that_blocks(*, run_dir, config):
    return _Sink(lambda: _never.wait())


def sink_that_raises(*, run_dir, config):
    def fail():
        raise OSError("metrics server unreachable")

    return _Sink(fail)


def sink_factory_that_raises(*, run_dir, config):
    raise PermissionError("no API key")
