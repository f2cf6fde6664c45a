"""The engine as the HTTP app holds it: what every route module reads from ``request.app``.

Its own module so that the route modules (routes, colocated, distributed) import it from below
instead of from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from policies.engine.scheduler import Scheduler


@dataclass
class Engine:
    """What the routes need: the scheduler plus the facts /get_*_info report."""

    scheduler: Scheduler
    model_path: str
    server_info: dict[str, Any]


ENGINE_KEY = web.AppKey("engine", Engine)
