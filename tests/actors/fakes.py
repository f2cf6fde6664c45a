"""Named fakes for loop tests that must control timing exactly (a slow engine, a slow learner).

``FakeEngines`` stands in for the engine set: one token per tick, and every token's id is
``100 + the version its weights had`` so a test can check the version recorded for each token
against ground truth. It honours both pause modes like the real server: ``abort`` ends in-flight
requests with their partial output and holds new ones until ``resume``; ``in_place`` freezes
in-flight requests between ticks and lets them continue under the new weights. With
``report_token_versions`` it reports per-token versions (as the embedded engine does), without
it only the answer's version (as SGLang does). ``outlive_versions=k`` makes one answer (group 0,
sample 0) deterministically span k weight updates: after each of its first k tokens it waits for
the next version instead of a timer, so a test of carried partials never depends on timing.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from buffers.types import Group
from policies.engine.client import GenerateOutput
from policies.trainer import StepStats

TOKEN_BASE = 100


class FakeEngines:
    def __init__(self, *, tick_s: float = 0.0005, stop_prob: float = 0.2, seed: int = 0,
                 report_token_versions: bool = True, outlive_versions: int = 0):
        self.version = 0
        self.outlive_versions = outlive_versions
        self._outliver: tuple[int, bool] = (-1, False)  # (version of its last token, finished)
        self.tick_s = tick_s
        self.stop_prob = stop_prob
        self.report_token_versions = report_token_versions
        self.rng = random.Random(seed)
        self.generated_tokens = 0
        self._running = asyncio.Event()
        self._running.set()
        self._abort = 0  # bumped by pause(abort): requests started before it end early
        self._in_flight = 0
        self._parked = 0  # in-flight requests frozen by pause(in_place)
        self._changed = asyncio.Condition()

    async def generate(self, input_ids, sampling_params, *, rid=None) -> GenerateOutput:
        if self.outlive_versions and rid is not None and rid.split("-")[:2] == ["g0", "0"]:
            return await self._outlive(input_ids, sampling_params)
        await self._running.wait()
        epoch = self._abort
        out: list[int] = []
        versions: list[str] = []
        finish = "length"
        await self._count(in_flight=1)
        try:
            for _ in range(sampling_params["max_new_tokens"]):
                await asyncio.sleep(self.tick_s * self.rng.random() * 2)
                if not self._running.is_set() and self._abort == epoch:  # in_place: freeze here
                    await self._count(parked=1)
                    await self._running.wait()
                    await self._count(parked=-1)
                if self._abort != epoch:
                    finish = "abort"
                    break
                out.append(TOKEN_BASE + self.version)
                versions.append(str(self.version))
                if self.rng.random() < self.stop_prob:
                    finish = "stop"
                    break
        finally:
            await self._count(in_flight=-1)
        return self._answer(input_ids, out, versions, finish)

    async def _outlive(self, input_ids, sampling_params) -> GenerateOutput:
        """The answer that outlives updates: one token per weight version until it holds
        ``outlive_versions + 1`` of them. ``pause`` waits for its token of the current version
        before it begins (so no version is skipped, and the answer never waits on an update that
        needs its own group trained first). Under ``abort`` each pause ends the request and the
        runner resumes it (prompt + partial answer), so progress is read from the input."""
        await self._running.wait()
        done = len(input_ids) - 3  # tokens already generated (the loop tests' prompts are 3 tokens)
        out, versions, finish = [], [], "stop"
        await self._count(in_flight=1)
        try:
            while True:
                out.append(TOKEN_BASE + self.version)
                versions.append(str(self.version))
                self._outliver = (self.version, done + len(out) > self.outlive_versions)
                await self._count()  # wakes a pause waiting for this token
                if self._outliver[1]:
                    break
                epoch = self._abort
                async with self._changed:  # wait for the next pause
                    await self._changed.wait_for(lambda e=epoch: self._abort != e or not self._running.is_set())
                if self._abort != epoch:
                    finish = "abort"
                    break
                await self._count(parked=1)
                await self._running.wait()
                await self._count(parked=-1)
        finally:
            await self._count(in_flight=-1)
        return self._answer(input_ids, out, versions, finish)

    def _answer(self, input_ids, out: list[int], versions: list[str], finish: str) -> GenerateOutput:
        self.generated_tokens += len(out)
        return GenerateOutput(output_ids=out, logprobs=[-1.0] * len(out), finish_reason=finish,
                              weight_version=str(self.version), prompt_tokens=len(input_ids),
                              completion_tokens=len(out), latency_s=0.0,
                              token_versions=versions if self.report_token_versions else None)

    async def generate_batch(self, input_ids, sampling_params, *, rids=None) -> list[GenerateOutput]:
        """The batch form: each member runs as its own request; the answer waits for all of them."""
        rids = rids or [None] * len(input_ids)
        return list(await asyncio.gather(*(self.generate(i, p, rid=r)
                                           for i, p, r in zip(input_ids, sampling_params, rids))))

    async def _count(self, *, in_flight: int = 0, parked: int = 0) -> None:
        async with self._changed:
            self._in_flight += in_flight
            self._parked += parked
            self._changed.notify_all()

    async def pause(self, mode: str = "abort") -> None:
        if self.outlive_versions:
            async with self._changed:
                await self._changed.wait_for(lambda: self._outliver[1] or self._outliver[0] == self.version)
        self._running.clear()
        if mode == "abort":
            self._abort += 1
        async with self._changed:  # quiescent: every in-flight request ended or frozen
            self._changed.notify_all()  # wakes an outliving answer waiting for this pause
            await self._changed.wait_for(lambda: self._in_flight == self._parked)

    async def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        assert not self._running.is_set(), "weights updated while serving"
        self.version = version

    async def resume(self) -> None:
        self._running.set()

    async def sync_weights(self, path: str | Path, version: int, pause_mode: str, sent=None) -> float:  # noqa: ANN001
        await self.pause(pause_mode)
        t0 = time.monotonic()
        await self.update_weights_from_disk(path, version)
        await self.resume()
        return time.monotonic() - t0


class FakeTrainer:
    """Records each batch; ``delay_s`` makes a slow learner (it runs on the learner's thread)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.batches: list[list[Group]] = []

    def step(self, batch: list[Group], version: int) -> StepStats:
        time.sleep(self.delay_s)
        self.batches.append(batch)
        n = sum(len(s.response_ids) for g in batch for s in g.samples)
        return StepStats(loss=0.0, pg_clipfrac=0.0, tis_mean=1.0, tis_clipfrac=0.0, kl=0.0, entropy=0.0,
                         grad_norm=0.0, n_tokens=n, n_samples=sum(len(g.samples) for g in batch))

    def save_weights(self, out_dir: Path) -> Path:
        return out_dir

    def save_checkpoint(self, out_dir: Path) -> None:
        (out_dir / "trainer.pt").write_bytes(b"fake")

    def close(self) -> None:
        pass
