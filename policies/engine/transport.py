"""One engine's HTTP transport: JSON exchanges bounded by a timeout, every failure an EngineError.

A connection failure, a timeout, a non-200 answer or a body that does not decode raises
EngineError(url, route, reason); nothing hangs. ``EngineClient`` adds the routes on top.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from policies.engine.errors import EngineError


class EngineTransport:
    """JSON over HTTP to the engine at `base_url`; owns its aiohttp session unless one is passed in."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        session: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def close(self) -> None:
        """Close the session if this client created it; a session passed in stays open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, route: str, body: Any, timeout_s: float | None = None) -> bytes:
        """One HTTP exchange; returns the body of a 200, raises EngineError otherwise."""
        limit = timeout_s if timeout_s is not None else self.timeout_s
        data = None if body is None else msgspec.json.encode(body)
        headers = {**self._headers, "Content-Type": "application/json"} if data is not None else self._headers
        try:
            async with self._get_session().request(
                method,
                self.base_url + route,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                payload = await resp.read()
                status = resp.status
        except TimeoutError:
            raise EngineError(self.base_url, route, f"timed out after {limit:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(self.base_url, route, f"connection failed: {exc!r}") from None
        if status != 200:
            raise EngineError(self.base_url, route, f"HTTP {status}: {_error_text(payload)}", status=status)
        return payload

    async def _refusable_call(self, route: str, body: dict[str, Any], timeout_s: float | None = None) -> bytes:
        """A POST whose 400 is a refusal with SGLang's reason in the body: EngineError "refused: ..."."""
        try:
            return await self._call("POST", route, body, timeout_s)
        except EngineError as exc:
            if exc.status == 400:
                raise EngineError(self.base_url, route, f"refused: {exc.reason}", status=400) from None
            raise

    def _decode(self, route: str, raw: bytes, kind: Any) -> Any:
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise EngineError(self.base_url, route, f"undecodable response ({exc}): {raw[:200]!r}") from None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # no connection cap: callers bound in-flight requests, and a pooled wait would eat
            # into each request's timeout
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session


def _error_text(payload: bytes) -> str:
    """The one-line reason from an error body ({"error"} or {"message"}), else its start."""
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict):
        for key in ("error", "message", "error_message", "detail"):
            if isinstance(decoded.get(key), str):
                return decoded[key]
            if isinstance(decoded.get(key), dict) and isinstance(decoded[key].get("message"), str):
                return decoded[key]["message"]
    return payload[:300].decode("utf-8", "replace").strip() or "(empty body)"
