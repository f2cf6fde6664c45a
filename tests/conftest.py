"""Shared test helpers: running coroutines without pytest plugins, and a tiny model checkpoint."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` (pytest-xdist; the README's test command) tests that share a
    per-session resource run on one worker, so it is made once: the Ray cluster
    (tests/integration/conftest.py) and the short real run (tests/runtime/short_run.py)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ray_address" in names or "ray_backend" in names or "[ray" in item.name:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "short_run" in getattr(getattr(item, "module", None), "__dict__", {}):
            item.add_marker(pytest.mark.xdist_group("short_run"))


def run(coro, timeout: float = 30.0):
    """Run ``coro`` on a fresh event loop, failing (not hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def copy_task():
    from launchers.recipes.copy_digits import make_task

    return make_task(seed=42, eval_num_prompts=200)
