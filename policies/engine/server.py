"""The embedded inference engine: a transformers causal LM behind SGLang's HTTP subset.

    python -m policies.engine.server --model-path DIR [--host 127.0.0.1] [--port 0]
        [--port-file PATH] [--device cpu] [--dtype float32] [--torch-threads 1]
        [--max-running-requests 256] [--weight-version 0] [--kv-cache on|off]

Lifecycle: load the model → start the decode loop → bind (127.0.0.1 unless told otherwise; port 0
picks a free port) → write the bound port to --port-file atomically (its existence means
"serving") → serve until SIGTERM/SIGINT → stop accepting, abort every request in flight (each
answers with its partial output, finish_reason abort) → exit 0. Dying with the parent is the
process manager's job (policies.engine.process sets PR_SET_PDEATHSIG).

`--kv-cache off` decodes by recomputing every row each step (the reference path, kept for
comparison: benchmarks/engine_decode.py). Its default comes from the environment variable
ASYNCRL_ENGINE_KV_CACHE (on when unset), so a process manager that passes only its own flags
still lets a caller pick.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import transformers
from aiohttp import web

from policies.engine.routes import Engine, build_app
from policies.engine.runner import DTYPES, ModelRunner
from policies.engine.scheduler import Scheduler

log = logging.getLogger("engine.server")

KV_CACHE_ENV = "ASYNCRL_ENGINE_KV_CACHE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m policies.engine.server", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="directory written by save_pretrained")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (see --port-file)")
    p.add_argument("--port-file", default=None, help="where to write the bound port once serving")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--weight-version", default="0")
    p.add_argument(
        "--kv-cache",
        choices=("on", "off"),
        default=os.environ.get(KV_CACHE_ENV, "on"),
        help=f"decode with a KV cache (default: ${KV_CACHE_ENV}, else on)",
    )
    args = p.parse_args(argv)
    if args.kv_cache not in ("on", "off"):  # argparse does not check a default against choices
        p.error(f"${KV_CACHE_ENV} must be on or off, got {args.kv_cache!r}")
    return args


def write_port_file(path: str, port: int) -> None:
    """Write then rename, so a reader never sees a partial number."""
    tmp = f"{path}.tmp.{os.getpid()}"
    Path(tmp).write_text(f"{port}\n")
    os.replace(tmp, path)


async def serve(engine: Engine, *, host: str, port: int, port_file: str | None) -> None:
    """Serve until SIGTERM/SIGINT, or until the decode loop dies (a bug: exit 1)."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    decode_loop = asyncio.create_task(engine.scheduler.run(), name="engine-decode-loop")
    stopped = asyncio.create_task(stop.wait(), name="engine-stop-signal")
    runner = await _start_http(engine, host, port)
    if port_file:
        write_port_file(port_file, engine.server_info["port"])
    await asyncio.wait([stopped, decode_loop], return_when=asyncio.FIRST_COMPLETED)
    crashed = decode_loop.done()
    if crashed:
        log.error("decode loop died: %r", decode_loop.exception())
    log.info("shutting down")
    await runner.cleanup()  # stop listening, abort everything in flight (on_shutdown), drain handlers
    for task in (stopped, decode_loop):
        task.cancel()
    await asyncio.gather(stopped, decode_loop, return_exceptions=True)
    if crashed:
        raise SystemExit(1)


async def _start_http(engine: Engine, host: str, port: int) -> web.AppRunner:
    app = build_app(engine)
    # on_shutdown runs after the listening socket closed and before aiohttp waits for handlers:
    # aborting there makes every pending /generate answer at once with its partial output.
    app.on_shutdown.append(lambda _app: _close(engine.scheduler))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    engine.server_info["port"] = runner.addresses[0][1]
    log.info("serving %s on http://%s:%d", engine.model_path, host, engine.server_info["port"])
    return runner


async def _close(scheduler: Scheduler) -> None:
    scheduler.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.torch_threads)
    transformers.utils.logging.disable_progress_bar()  # keep the engine log to one line per event
    runner = _load_or_exit(args.model_path, device=args.device, dtype=args.dtype, kv_cache=args.kv_cache == "on")
    info = {
        "host": args.host,
        "device": args.device,
        "dtype": args.dtype,
        "max_running_requests": args.max_running_requests,
        "context_length": runner.max_context,
        # SGLang's scheduler facts. Its KV pool has a fixed size; this engine's cache grows on
        # demand, so the most tokens it will ever hold is every running request at full context.
        "max_total_num_tokens": args.max_running_requests * runner.max_context,
        "max_req_input_len": runner.max_context - 1,
        "vocab_size": runner.vocab_size,
        "kv_cache": runner.use_kv_cache,
        "engine": "policies.engine.server",
    }

    async def _main() -> None:
        scheduler = Scheduler(
            runner, max_running=args.max_running_requests, weight_version=args.weight_version
        )
        engine = Engine(scheduler=scheduler, model_path=args.model_path, server_info=info)
        await serve(engine, host=args.host, port=args.port, port_file=args.port_file)

    _run(_main())
    log.info("exiting")
    logging.shutdown()
    # Everything is closed by now; skipping interpreter teardown saves ~1 s per exit (measured
    # after a transformers model load), which adds up across engine restarts and tests.
    os._exit(0)


def _load_or_exit(model_path: str, *, device: str, dtype: str, kv_cache: bool) -> ModelRunner:
    """Load the model, or exit 1 with a one-line reason (the process manager shows the log tail)."""
    if not (Path(model_path) / "config.json").is_file():
        log.error(
            "cannot load model: %s has no config.json (expected a save_pretrained directory)", model_path
        )
        sys.exit(1)
    try:
        return ModelRunner.load(model_path, device=device, dtype=dtype, use_kv_cache=kv_cache)
    except Exception as exc:
        log.error("cannot load model from %s: %s: %s", model_path, type(exc).__name__, exc)
        sys.exit(1)


def _run(coro) -> None:  # noqa: ANN001
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
