"""FAKE `python -m sglang.launch_server`, for tests only: this is NOT SGLang.

Real SGLang needs a GPU and pins its own torch, so it cannot run on the project's CPU machines.
With tests/fakes on PYTHONPATH, `python -m sglang.launch_server ...` runs this instead. It takes
SGLang's command line (what SGLangProcess passes), logs every flag it got, and serves the
project's embedded engine (policies.engine.server, the same HTTP subset) on the given host and
port, in this process, so the pid the caller watches is the server's. Flags the embedded engine
has no use for (every `--sglang-X` passthrough, `--tp-size`) are accepted and listed in the log as
ignored by the fake.

A taken port fails at once with SGLang's words ("address already in use"), before the model loads.

Failure modes for the process tests, chosen by the environment variable FAKE_SGLANG_FAIL:
    exit        log an error and exit 1 before serving (as SGLang does on a bad flag)
    unhealthy   listen on the port but answer 503 to every request, forever (stuck loading)
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

# the flags the embedded engine takes, and how SGLang's values map onto its own
TAKEN = ("--model-path", "--host", "--port", "--device", "--dtype", "--max-running-requests", "--weight-version")
DTYPES = {"auto": "float32", "float": "float32", "float32": "float32", "half": "float16", "float16": "float16",
          "bfloat16": "bfloat16"}


def parse(argv: list[str]) -> tuple[dict[str, str], dict[str, str | bool]]:
    """(the flags the embedded engine takes, every other flag: value or True when bare)."""
    taken: dict[str, str] = {}
    other: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            sys.exit(f"fake sglang.launch_server: unexpected argument {arg!r}")
        value: str | bool
        if "=" in arg:
            arg, value = arg.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = True
            i += 1
        if arg in TAKEN and isinstance(value, str):
            taken[arg] = value
        else:
            other[arg] = value
    return taken, other


def check_port(host: str, port: int) -> None:
    """Fail at once on a taken port, before the slow model load (SGLang checks its ports early too)."""
    try:
        with socket.socket() as s:
            s.bind((host, port))
    except OSError as exc:
        sys.exit(f"fake sglang: error while attempting to bind on address {(host, port)}: {exc.strerror.lower()}")


async def unhealthy(host: str, port: int) -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=503, text="fake sglang: still loading (FAKE_SGLANG_FAIL=unhealthy)")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    print(f"FAKE sglang.launch_server (tests/fakes, not SGLang), pid {os.getpid()}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}, argv: {' '.join(argv)}", flush=True)
    taken, other = parse(argv)
    if other:
        print("fake sglang: flags ignored by the fake: "
              + " ".join(k if v is True else f"{k} {v}" for k, v in other.items()), flush=True)
    mode = os.environ.get("FAKE_SGLANG_FAIL", "")
    if mode == "exit":
        sys.exit("fake sglang: error: simulated start failure (FAKE_SGLANG_FAIL=exit)")
    if "--model-path" not in taken or "--port" not in taken:
        sys.exit("fake sglang: error: --model-path and --port are required")
    check_port(taken.get("--host", "127.0.0.1"), int(taken["--port"]))
    if mode == "unhealthy":
        asyncio.run(unhealthy(taken.get("--host", "127.0.0.1"), int(taken["--port"])))
        return
    if "--dtype" in taken:
        taken["--dtype"] = DTYPES[taken["--dtype"]]
    from policies.engine import server

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    server.main([part for flag, value in taken.items() for part in (flag, value)] + ["--torch-threads", threads])


if __name__ == "__main__":
    main(sys.argv[1:])
