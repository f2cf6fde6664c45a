"""The engine set: N engine server subprocesses behind one routing and control surface.

Routing sends each request to the engine with the fewest requests in flight. Control calls
(pause, weight update, continue) go to every engine directly and concurrently: routers in front
of SGLang do not forward them. Every call carries a timeout (the client's).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from policies.engine.client import EngineClient, GenerateOutput
from policies.engine.process import EngineProcess


class EngineSet:
    def __init__(self, *, model_path: str | Path, n: int, log_dir: Path, threads: int = 1,
                 max_running_requests: int = 512, timeout_s: float = 120.0, start_timeout_s: float = 180.0):
        self.model_path = str(model_path)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.processes = [
            EngineProcess(model_path, log_path=log_dir / f"engine{i}.log", torch_threads=threads,
                          max_running_requests=max_running_requests)
            for i in range(n)
        ]
        self.clients: list[EngineClient] = []
        self.in_flight: list[int] = [0] * n
        self.generated_tokens = 0
        self._rids = itertools.count()

    async def start(self) -> None:
        """Start every engine and wait until each can generate (in parallel)."""
        for p in self.processes:
            p.start()
        urls = await asyncio.gather(*(p.wait_ready(self.start_timeout_s) for p in self.processes))
        self.clients = [EngineClient(url, timeout_s=self.timeout_s) for url in urls]

    def _pick(self) -> int:
        return min(range(len(self.clients)), key=lambda i: self.in_flight[i])

    async def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None
                       ) -> GenerateOutput:
        """One /generate on the least-loaded engine; raises ``EngineError`` on failure."""
        i = self._pick()
        self.in_flight[i] += 1
        try:
            out = await self.clients[i].generate(
                input_ids, sampling_params, rid=rid or f"r{next(self._rids)}"
            )
        finally:
            self.in_flight[i] -= 1
        self.generated_tokens += len(out.output_ids)
        return out

    async def pause(self, mode: str = "abort") -> None:
        await asyncio.gather(*(c.pause(mode) for c in self.clients))

    async def resume(self) -> None:
        await asyncio.gather(*(c.resume() for c in self.clients))

    async def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        await asyncio.gather(
            *(c.update_weights_from_disk(str(path), weight_version=str(version)) for c in self.clients)
        )

    async def stop(self) -> None:
        """Close clients and stop every process (SIGTERM, then SIGKILL); idempotent."""
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await asyncio.gather(*(p.stop() for p in self.processes), return_exceptions=True)
