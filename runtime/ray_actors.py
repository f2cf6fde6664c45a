"""The Ray actors that host engines and the trainer, and the handles that make them look local.

    EngineHost (async actor)  owns one engine server subprocess: an EngineProcess (SGLangProcess with
                              --engine sglang), the same command as on the local backend, forked on
                              the actor's event-loop thread with PR_SET_PDEATHSIG, so the server
                              dies with the actor however it dies.
    RayEngineProcess          the engine set's handle on one host, with EngineProcess's interface.
                              The engine is still driven over HTTP (the SGLang protocol); the actor
                              only starts, watches and stops it. The host's death (``ray.kill``, a
                              lost node) reads as the engine process having exited, so the engine
                              set's health checks restart it with a new host in the same bundle.
    TrainerActor              hosts one rank's ``PolicyTrainer``; RayTrainer is the learner's handle on
                              the run's N ranks (one per learner GPU, or --actor-num-cpu-ranks), the
                              ``policies.trainer_api.Trainer`` every host implements. Calls block the
                              learner's compute thread (never the event loop) and are bounded: a dead
                              actor or a call past its timeout ends the run with one line
                              (``RunFailed``), never a hang.

RayHosts builds both in their seats of the run's placement group (``runtime.placement``). Only the
Ray backend imports this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from policies import trainer_api
from policies.engine.process import EngineStartError
from policies.engine.sglang_process import engine_process
from runtime.core.errors import RunFailed
from runtime.placement import Layout, Seat

log = logging.getLogger(__name__)


@ray.remote
class EngineHost:
    """One engine server subprocess; its lifetime is this actor's."""

    def __init__(self, model_path: str, kwargs: dict[str, Any]):
        self.process = engine_process(model_path, **kwargs)  # kwargs["engine"]: embedded or sglang
        self.started = asyncio.Event()

    async def start(self) -> int:
        """Start the server; its pid. Forked here, on this actor's event-loop thread, which lives as
        long as the actor (PR_SET_PDEATHSIG is tied to the forking thread)."""
        self.process.start()
        self.started.set()
        return self.process.pid

    async def wait_ready(self, timeout_s: float) -> str:
        return await self.process.wait_ready(timeout_s)

    async def wait_exit(self) -> int | None:
        """Returns the server's exit status once it has ended."""
        await self.started.wait()
        while not await self.process.exited_within(3600.0):
            pass
        return self.process.returncode

    async def stop(self, grace_s: float) -> None:
        await self.process.stop(grace_s)


class RayEngineProcess:
    """EngineProcess's interface over an EngineHost actor (built by ``RayHosts.engine``)."""

    def __init__(self, model_path: str, *, actor_options: dict[str, Any], log_path: str | os.PathLike[str],
                 **kwargs: Any):
        self.model_path = str(model_path)
        self.log_path = Path(log_path)
        self._kwargs = dict(kwargs, log_path=str(log_path))
        self._options = actor_options
        self._host: Any = None
        self._started: Any = None  # ObjectRef of EngineHost.start: the server's pid
        self._exit: concurrent.futures.Future[int | None] | None = None
        self._pid: int | None = None
        self._url: str | None = None
        self._killed = False  # by us: its death is expected, not news

    @property
    def name(self) -> str:
        return self._options["name"]

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._exit is not None and not self._exit.done()

    @property
    def returncode(self) -> int | None:
        """The server's exit status; -SIGKILL when its host actor died (it took the server with it)."""
        if self._exit is None or not self._exit.done():
            return None
        return -signal.SIGKILL if self._exit.exception() is not None else self._exit.result()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("engine url is unknown until wait_ready() returns")
        return self._url

    def start(self) -> None:
        """Create the host actor (placed by Ray when its bundle is free) and start its server."""
        if self._host is not None:
            raise RuntimeError("RayEngineProcess.start() called twice")
        self._host = EngineHost.options(**self._options).remote(self.model_path, self._kwargs)
        self._started = self._host.start.remote()
        self._exit = self._host.wait_exit.remote().future()
        self._exit.add_done_callback(self._log_death)

    async def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Until the host is placed and its server answers /health_generate (both within ``timeout_s``)."""
        if self._host is None:
            raise RuntimeError("wait_ready() before start()")

        async def placed_and_ready() -> str:
            self._pid = await self._started
            return await self._host.wait_ready.remote(timeout_s)

        try:
            self._url = await asyncio.wait_for(placed_and_ready(), timeout_s)
        except TimeoutError:
            raise EngineStartError(f"engine host {self.name} was not placed and ready within {timeout_s:g}s; "
                                   f"last lines of {self.log_path}:\n{self.log_tail()}") from None
        except RayTaskError as e:  # the server failed to start: its EngineStartError, with the log tail
            raise EngineStartError(str(e.cause)) from None
        except RayActorError as e:
            raise EngineStartError(f"engine host {self.name} died before its engine was ready: {_first_line(e)}") \
                from None
        return self._url

    async def exited_within(self, timeout_s: float) -> bool:
        if self._exit is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._exit)), timeout_s)
        except TimeoutError:
            return False
        except RayError:  # the host died: so did its server
            return True
        return True

    def kill(self) -> None:
        """Kill the host actor now (its server dies with it). Idempotent."""
        if self._host is not None:
            self._killed = True
            ray.kill(self._host, no_restart=True)

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the server through its host (SIGKILL after ``grace_s``), then end the host."""
        if self._host is None:
            return
        if self.alive:
            try:
                await asyncio.wait_for(self._host.stop.remote(grace_s), grace_s + 5.0)
            except (TimeoutError, RayActorError):
                pass
        self.kill()

    def log_tail(self, lines: int = 30) -> str:
        """The server's log is written where the local backend writes it, by the host, on its node."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError as e:
            return f"(log unreadable here: {e}; the host may be on another node)"

    def _log_death(self, fut: concurrent.futures.Future[int | None]) -> None:
        if fut.exception() is not None and not self._killed:
            log.warning("engine host %s died: %s", self.name, _first_line(fut.exception()))


@ray.remote
class TrainerActor:
    """One rank of the trainer in its own actor: built by ``start``, then serving ``trainer_api``
    requests as msgpack bytes (``trainer_api.serve``)."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a port free on it: the ranks' rendezvous, hosted by rank 0."""
        from policies.weight_sync import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def start(self, model_path: str, kwargs: dict[str, Any]) -> None:
        from policies.train_backend import build_trainer

        self.trainer = build_trainer(model_path, **kwargs)

    def call(self, raw: bytes) -> bytes:
        return trainer_api.serve(self.trainer, raw)


class RayTrainer(trainer_api.RemoteTrainer):
    """``Trainer`` over ``world_size`` TrainerActors, rank r in ``actor_options[r]``'s seat; every call
    goes to every rank and is bounded by ``timeout_s``: a dead actor or a call past its timeout ends
    the run with one line (``RunFailed``), never a hang."""

    where = "the trainer actor"

    def __init__(self, model_path: str | Path, *, actor_options: list[dict[str, Any]], timeout_s: float,
                 threads: int = 1, **trainer_kwargs: Any):
        self._timeout_s = timeout_s
        self._actors = [TrainerActor.options(**o).remote() for o in actor_options]
        world = len(self._actors)
        if world > 1:  # rank 0's node hosts the ranks' rendezvous
            address, port = self._wait([self._actors[0].endpoint.remote()], "endpoint")[0]
            trainer_kwargs.update(world_size=world, dist_url=f"tcp://{address}:{port}")
        # they load while the engines start; a trainer that cannot load fails the first call
        trainer_kwargs["threads"] = threads
        self._started: list[Any] | None = [a.start.remote(str(model_path), dict(trainer_kwargs, rank=r))
                                           for r, a in enumerate(self._actors)]

    def weight_group_endpoint(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """Rank 0's node, which hosts the weight-update group (its engines may be on other nodes)."""
        return self.call(trainer_api.WeightGroupEndpoint(self._wait([self._actors[0].endpoint.remote()],
                                                                    "endpoint")[0][0]))

    def _exchange(self, raw: bytes, request: trainer_api.Request) -> bytes:
        if self._started is not None:
            started, self._started = self._started, None
            self._wait(started, "start")
        replies = self._wait([a.call.remote(raw) for a in self._actors], type(request).__name__)
        return trainer_api.first_failure(replies)

    def _wait(self, refs: list[Any], what: str) -> list[Any]:
        # futures rather than ray.get, which warns (once) about blocking when called in an async
        # actor, even from this worker thread
        futures = [r.future() for r in refs]
        try:
            return [f.result(timeout=self._timeout_s) for f in futures]
        except RayActorError as e:
            raise RunFailed(f"the trainer actor died during {what}: {_first_line(e)}") from None
        except TimeoutError:
            raise RunFailed(f"the trainer's {what} took over {self._timeout_s:g}s (--stall-timeout)") from None
        except RayTaskError as e:
            raise trainer_api.RemoteFailure(f"trainer {what} failed in the trainer actor:\n{e}") from None

    def close(self) -> None:
        for a in self._actors:
            ray.kill(a, no_restart=True)


class RayHosts:
    """Builds one run's engine hosts and trainer actor in their seats of its placement group.

    Actor names are ``<tag>:trainer`` and ``<tag>:engine<i>.<k>`` (k-th host of engine i), so an
    operator (or a test) can find and kill one."""

    def __init__(self, *, group: PlacementGroup, layout: Layout, tag: str, trainer_timeout_s: float):
        self.group, self.layout, self.tag = group, layout, tag
        self.trainer_timeout_s = trainer_timeout_s
        self._hosts_made: dict[int, int] = {}

    def engine(self, index: int, model_path: str, **kwargs: Any) -> RayEngineProcess:
        seat = self.layout.engines[index]
        k = self._hosts_made[index] = self._hosts_made.get(index, -1) + 1
        if seat.num_gpus:
            kwargs["device"] = "cuda"  # the host sees the GPUs of its seat (CUDA_VISIBLE_DEVICES)
        return RayEngineProcess(model_path, actor_options=self._options(seat, f"engine{index}.{k}"), **kwargs)

    def trainer(self, model_path: str | Path, **kwargs: Any) -> RayTrainer:
        """One actor per learner rank, each in its own seat (``<tag>:trainer``, then ``:trainer1``...)."""
        if self.layout.learner.num_gpus:
            kwargs["device"] = "cuda"  # each actor sees the GPU of its seat (CUDA_VISIBLE_DEVICES)
        options = [self._options(seat, "trainer" + (str(r) if r else ""))
                   for r, seat in enumerate(self.layout.learners)]
        return RayTrainer(model_path, actor_options=options, timeout_s=self.trainer_timeout_s, **kwargs)

    def _options(self, seat: Seat, name: str) -> dict[str, Any]:
        return dict(name=f"{self.tag}:{name}", num_cpus=seat.num_cpus, num_gpus=seat.num_gpus, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=seat.bundle))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
