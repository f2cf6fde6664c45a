"""The errors a call to an engine raises: one line, naming the engine and the route."""

from __future__ import annotations


class EngineError(RuntimeError):
    """A call to an engine failed; `reason` is one line, `status` the HTTP status if any."""

    def __init__(self, url: str, route: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"engine {url}{route}: {reason}")
        self.url, self.route, self.reason, self.status = url, route, reason, status


class EngineLost(EngineError):
    """The engine serving this request failed; the request may be re-sent to another one."""
