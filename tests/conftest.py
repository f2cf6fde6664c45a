"""Shared test helpers: running coroutines without pytest plugins, and a tiny model checkpoint."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(coro, timeout: float = 30.0):
    """Run ``coro`` on a fresh event loop, failing (not hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def copy_task():
    from launchers.recipes.copy_digits import make_task

    return make_task(seed=42, eval_num_prompts=200)
