"""``--backend ray``: the same run, with every long-lived part a Ray actor.

    driver (python -m runtime.launch)       connects to a cluster or starts one; reserves the placement
        |                                   group; starts the controller; waits for its outcome
        v
    Controller (async actor, this node)     runtime.launch.train as on the local backend: buffer,
        |                                   generator, learner loop, broadcaster, evaluator, scheduler,
        |                                   all asyncio tasks on its one event loop (uvloop)
        +-- TrainerActor r   (bundle r)     learner rank r of R: the policy's optimizer steps (FSDP2
        |                                   when R > 1; runtime.ray_actors, policies/fsdp.py)
        +-- EngineHost i     (bundle R+i)   engine i's server subprocess, reached over HTTP

The controller runs on the driver's node, so the run directory (config, metrics, summary, logs,
trace) is written exactly as on the local backend, plus ``ray/`` with Ray's own temp files and logs
when the run started its cluster. Weights still travel as files in shared memory (/dev/shm): on one
host today; NCCL broadcast across hosts is issue 3 part 3.

Cluster: ``--ray-address`` or ``$RAY_ADDRESS`` connects to an existing cluster (one that does not
answer fails at once, in one line); otherwise a local cluster is started with its temp files under
the run directory, no dashboard, and a token (token authentication) kept in this process's
environment rather than written to ``~/.ray``. Placement is checked against the cluster before
anything starts (``runtime.placement.misfit``). Only this module and ``runtime.ray_actors`` import
Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

# Read by Ray once, when it is imported: the controller's progress lines reach the terminal as on
# the local backend (no "(Controller pid=...)" prefix, none folded as repeats), and no usage report.
for _name, _value in (("RAY_DISABLE_WORKER_LOG_PREFIX", "1"), ("RAY_DEDUP_LOGS", "0"),
                      ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)

import ray  # noqa: E402
from ray.exceptions import GetTimeoutError, RayActorError, TaskCancelledError  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from runtime import placement  # noqa: E402
from runtime.agent_config import RunSpec  # noqa: E402
from runtime.config import ConfigError  # noqa: E402
from runtime.core.errors import RunFailed  # noqa: E402
from runtime.ray_actors import RayHosts  # noqa: E402

Train = Callable[[RunSpec, Path, Any], Awaitable[dict[str, Any]]]  # runtime.launch.train

NAMESPACE = "asyncrl"
CONNECT_TIMEOUT_S = 20.0  # ray.init against an address that answers but is no Ray head can retry forever
PROBE_TIMEOUT_S = 3.0  # a TCP connect to the head's port: an unreachable address fails in this long
# Unix socket paths are capped at 107 bytes and Ray puts them at <temp>/session_<date>_<pid>/sockets/
# plasma_store (66 bytes past <temp>): a longer temp dir than this goes to a short one under /tmp,
# linked from <run-dir>/ray.
MAX_TEMP_DIR = 40


def run(spec: RunSpec, run_dir: Path, train: Train) -> dict[str, Any]:
    """Run ``train`` (``runtime.launch.train``, passed in: it is pickled by reference into the
    controller) on Ray and return the summary; raises what ``train`` raises, as the local backend
    does (``RunFailed``, ``CheckpointError``, ``ConfigError``, ``KeyboardInterrupt``)."""
    cfg = spec.base
    run_dir = run_dir.resolve()  # actors may have another working directory
    layout = placement.plan(cfg.placement, num_engines=cfg.rollout.rollout_num_engines,
                            learner_threads=cfg.perf.learner_threads, engine_threads=cfg.perf.engine_threads)
    # A local cluster has this machine's cores, or what the layout asks if that is more: CPU bundles
    # are Ray's bookkeeping of threads, which the local backend oversubscribes just the same. GPUs
    # are what Ray detects, so a GPU layout is checked against real devices.
    connect(cfg.run.ray_address or os.environ.get("RAY_ADDRESS", ""), run_dir,
            num_cpus=max(os.cpu_count() or 1, int(layout.asks()["CPU"])))
    try:
        group = reserve(layout, timeout_s=cfg.async_.engine_start_timeout)
        hosts = RayHosts(group=group, layout=layout, tag=str(run_dir), trainer_timeout_s=cfg.async_.stall_timeout)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        controller = Controller.options(name=f"{run_dir}:controller", scheduling_strategy=here).remote()
        return _outcome(controller.run.remote(spec, str(run_dir), hosts, train))
    finally:
        ray.shutdown()  # a cluster this run started stops with it; its actors and placement group end


def _outcome(ref: Any) -> dict[str, Any]:
    try:
        kind, message, summary = ray.get(ref)
    except KeyboardInterrupt:
        # CancelledError in the controller's train(), which records an interrupted run and stops every
        # actor; not recursive, or the calls it makes while stopping them would be cancelled too
        ray.cancel(ref, recursive=False)
        try:
            ray.get(ref, timeout=60)
        except (TaskCancelledError, RayActorError, GetTimeoutError):
            pass
        raise
    except RayActorError as e:
        raise RunFailed(f"the controller actor died: {str(e).strip().splitlines()[0]}") from None
    if kind == "completed":
        return summary
    if kind == "config":
        flag, _, reason = message.partition(": ")
        raise ConfigError(flag, reason)
    if kind == "checkpoint":
        from runtime.checkpoint import CheckpointError

        raise CheckpointError(message)
    raise RunFailed(message)


@ray.remote(num_cpus=0, max_restarts=0)
class Controller:
    """``runtime.launch.train`` in an async actor: every light, long-lived actor of the run as an
    asyncio task on this actor's one event loop, exactly as on the local backend."""

    async def run(self, spec: RunSpec, run_dir: str, hosts: RayHosts, train: Train
                  ) -> tuple[str, str, dict[str, Any] | None]:
        """``(kind, message, summary)``: kind ``completed`` with the summary, or the error's kind and
        its one line (exceptions are returned, not raised, so the driver gets them without Ray's
        wrapping)."""
        import transformers

        from runtime import checkpoint
        from runtime.logs import setup_logging

        transformers.utils.logging.disable_progress_bar()
        setup_logging(Path(run_dir))
        try:
            return "completed", "", await train(spec, Path(run_dir), hosts)
        except RunFailed as e:
            return "failed", str(e), None
        except checkpoint.CheckpointError as e:
            return "checkpoint", str(e), None
        except ConfigError as e:
            return "config", str(e), None


def connect(address: str, run_dir: Path, *, num_cpus: int) -> None:
    """Connect to the cluster at ``address`` (fails fast, in one line, when nothing answers), or
    start a local one whose temp files and logs live under ``run_dir/ray``."""
    common: dict[str, Any] = dict(namespace=NAMESPACE, logging_level=logging.WARNING, runtime_env=runtime_env())
    if not address:
        start_local_cluster(temp_dir(run_dir), num_cpus=num_cpus, **common)
        return
    if address.startswith("ray://"):
        raise RunFailed(f"--ray-address {address}: Ray Client (ray://) is not supported; run the launcher on a "
                        "node of the cluster with the head's host:port")
    probe(address)
    # Something listens: while Ray's native client retries it, its warnings (written straight to
    # file descriptor 2) go to ray/connect.log, and a head that never answers is given up on here.
    (run_dir / "ray").mkdir(exist_ok=True)
    with native_stderr_to(run_dir / "ray" / "connect.log") as terminal:
        timer = threading.Timer(CONNECT_TIMEOUT_S, _give_up, [address, terminal])
        timer.daemon = True
        timer.start()
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as e:
            raise RunFailed(f"--ray-address {address}: cannot connect: {str(e).strip().splitlines()[0]}") from None
        finally:
            timer.cancel()


def start_local_cluster(temp: Path, *, num_cpus: int, **init_kwargs: Any) -> str:
    """Start a Ray cluster on this machine with its files under ``temp``; returns its address. Token
    authentication stays on, with the token in this process's environment (inherited by the
    cluster and by any child that connects), so nothing is written to ``~/.ray``."""
    if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a new local cluster turns token mode on
        # ... and says so on every start: a warning about Ray's default, not about this run
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    temp.mkdir(parents=True, exist_ok=True)
    try:
        ray.init(num_cpus=num_cpus, _temp_dir=str(temp), include_dashboard=False, **init_kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise RunFailed(f"could not start a local Ray cluster ({str(e).strip().splitlines()[0]}); "
                        f"its logs are in {temp}") from None
    return ray.get_runtime_context().gcs_address


def temp_dir(run_dir: Path) -> Path:
    """``run_dir/ray``, or a short directory under /tmp linked from there when that path is too long
    for Ray's Unix sockets (its logs stay there after the run, one link away)."""
    inside = run_dir / "ray"
    if len(str(inside)) <= MAX_TEMP_DIR:
        return inside
    short = Path(tempfile.mkdtemp(prefix="asyncrl-ray-", dir="/tmp"))
    inside.unlink(missing_ok=True)
    inside.symlink_to(short, target_is_directory=True)
    return short


def runtime_env() -> dict[str, Any]:
    """For every worker of the run: uvloop, and the driver's working directory (relative paths in the
    config mean the same in every actor, as on the local backend)."""
    return {"worker_process_setup_hook": "runtime.backend_ray.setup_worker",
            "env_vars": {"ASYNCRL_CWD": os.getcwd(), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}}


def setup_worker() -> None:
    """Runs in each Ray worker before any actor: async actors' loops are then uvloop's (Ray makes
    them with asyncio.new_event_loop, which follows the policy)."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    cwd = os.environ.get("ASYNCRL_CWD", "")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def probe(address: str) -> None:
    """Fail in one line within ``PROBE_TIMEOUT_S`` when nothing listens at ``host:port``."""
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:
        if address == "auto":
            return  # ray.init finds the cluster on this node
        raise RunFailed(f"--ray-address {address}: expected host:port (the head's GCS address), or auto")
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise RunFailed(f"--ray-address {address}: no Ray cluster reachable ({reason}); start one with "
                        f"`ray start --head` or leave the address unset for a local one") from None


def reserve(layout: placement.Layout, *, timeout_s: float) -> PlacementGroup:
    """The run's placement group, ready; a layout the cluster cannot hold fails at once in one line."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if why := placement.misfit(layout, nodes):
        raise RunFailed(f"placement: {why}")
    group = placement_group(layout.bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        raise RunFailed(f"placement: the {layout.name} layout ({layout.describe()}) was not placed within "
                        f"{timeout_s:g}s (--engine-start-timeout); free now: {ray.available_resources()}") from None
    return group


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[int]:
    """File descriptor 2 (native code writes there directly) goes to ``path`` inside the block;
    yields a descriptor of the terminal's stderr."""
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)


def _give_up(address: str, terminal: int) -> None:
    line = f"run failed: --ray-address {address}: no Ray cluster answered within {CONNECT_TIMEOUT_S:g}s\n"
    os.write(terminal, line.encode())
    os._exit(1)  # ray.init holds the main thread in native code: nothing else can end it
