"""The command line that launches a real SGLang server, and the `--sglang-X` passthrough parser.

Real SGLang (`python -m sglang.launch_server`) needs a GPU, so the runtime never runs it on the
project's CPU machines; on GPU machines it stands in for the embedded engine, which speaks the
same HTTP subset (see shared/PROTOCOL.md). Both functions are pure: they build and split argv
lists and start nothing, so they can be tested anywhere.

The runtime owns the flags that decide where and how it talks to the server (model path, bind
address, port, tensor-parallel size, API key) and those its own options already set (device,
dtype, request capacity, the initial weight version, which must match the version the learner
resumes at): a user passing them again through `--sglang-...` would create two sources of truth
that silently disagree. Those keys are refused. Every other SGLang server flag goes through
unchanged; `tests/policies/test_sglang_command.py` checks the flag names against the source of
the newest sglang release.
"""

from __future__ import annotations

import sys

PASSTHROUGH_PREFIX = "--sglang-"

# Server flags (without "--") whose values the runtime sets itself, including SGLang's aliases
# for them (`--model` for `--model-path`, `--tensor-parallel-size` for `--tp-size`) and the
# short `tp` some launchers use.
RUNTIME_OWNED_FLAGS = frozenset(
    {"model-path", "model", "host", "port", "tp-size", "tp", "tensor-parallel-size", "api-key",
     "device", "dtype", "max-running-requests", "weight-version"}
)


def sglang_command(
    *,
    model_path: str,
    port: int,
    host: str = "127.0.0.1",
    tp_size: int = 1,
    passthrough: dict[str, str | bool] | None = None,
    api_key: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_running_requests: int | None = None,
    weight_version: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv that starts `sglang.launch_server` for `model_path` on host:port with `tp_size` GPUs.

    `passthrough` maps SGLang flag names (without the leading "--", e.g. "mem-fraction-static",
    as returned by `parse_sglang_passthrough`) to values: a string becomes `--name value`, True
    becomes the bare flag `--name`, False omits it (so a boolean option can be switched off from
    a config without deleting the key). Underscores in names are turned into hyphens, SGLang's
    spelling, so `mem_fraction_static` works too. Keys the runtime owns (RUNTIME_OWNED_FLAGS) raise
    ValueError, as do malformed keys (empty, leading "-", whitespace) and two keys that name the
    same flag. Numbers are accepted and written with str().

    The host defaults to 127.0.0.1: the server has no authentication unless `api_key` is set, so
    it is bound to loopback unless the caller decides otherwise. `api_key` (if given) becomes
    `--api-key`; the client then sends it as a Bearer token. Note that a value on the command line
    is visible to other local users through the process list. `device`, `dtype`,
    `max_running_requests` and `weight_version` become their flags when given (None: SGLang's
    default).
    """
    _check_launch_args(model_path=model_path, port=port, tp_size=tp_size, host=host, api_key=api_key)
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host]
    cmd += ["--port", str(port), "--tp-size", str(tp_size)]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    owned = {"--device": device, "--dtype": dtype, "--max-running-requests": max_running_requests,
             "--weight-version": weight_version}
    cmd += [part for flag, value in owned.items() if value is not None for part in (flag, str(value))]
    return cmd + _passthrough_args(passthrough or {})


def _check_launch_args(*, model_path: str, port: int, tp_size: int, host: str, api_key: str | None) -> None:
    if not model_path:
        raise ValueError("model_path must be non-empty")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")
    if not host:
        raise ValueError("host must be non-empty")
    if api_key is not None and not api_key:
        raise ValueError("api_key must be non-empty when given")


def _passthrough_args(passthrough: dict[str, str | bool]) -> list[str]:
    """``--flag value`` pairs for the passthrough map; see ``sglang_command`` for the rules."""
    cmd: list[str] = []
    seen: dict[str, str] = {}  # normalized flag -> key as given, to name both in a clash
    for key, value in passthrough.items():
        flag = _normalize_flag(key)
        if flag in RUNTIME_OWNED_FLAGS:
            raise ValueError(
                f"SGLang flag --{flag} (passthrough key {key!r}) is set by the runtime; "
                "use the runtime's own option instead"
            )
        if flag in seen:
            raise ValueError(f"passthrough keys {seen[flag]!r} and {key!r} both name --{flag}")
        seen[flag] = key
        if value is True:
            cmd.append(f"--{flag}")
        elif value is False:
            continue
        elif isinstance(value, str):
            cmd += [f"--{flag}", value]
        elif isinstance(value, (int, float)):
            cmd += [f"--{flag}", str(value)]
        else:
            raise TypeError(f"passthrough value for {key!r} must be str or bool, got {type(value).__name__}")
    return cmd


def parse_sglang_passthrough(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Split `--sglang-X VALUE`, `--sglang-X=VALUE` and bare `--sglang-X` out of `argv`.

    Returns ({X: VALUE or True}, the remaining argv in order). This lets the runtime's own CLI
    accept any SGLang server option without declaring each one: `--sglang-mem-fraction-static
    0.7` reaches SGLang as `--mem-fraction-static 0.7` (through `sglang_command`), and the
    remaining argv goes to the runtime's parser untouched.

    A `--sglang-X` is bare (True) when it is the last item or the next item is another flag: a
    token that starts with "-" and is not a number (so `--sglang-foo -1` still passes "-1" as the
    value). Use `--sglang-X=VALUE` for a value that starts with "-"; put a bare `--sglang-X` before
    another flag or at the end, since a positional argument after it is taken as its value
    (nothing here knows which SGLang flags are boolean). Everything after a lone "--"
    is left in the remaining argv, as argparse would treat it. An empty name or the same name
    given twice raises ValueError; runtime-owned names are refused later, by `sglang_command`.
    """
    options: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if not arg.startswith(PASSTHROUGH_PREFIX):
            rest.append(arg)
            i += 1
            continue
        body = arg[len(PASSTHROUGH_PREFIX) :]
        value: str | bool
        if "=" in body:
            name, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not _is_flag(argv[i + 1]):
            name, value = body, argv[i + 1]
            i += 2
        else:
            name, value = body, True
            i += 1
        if not name:
            raise ValueError(f"{arg!r}: missing the SGLang flag name after {PASSTHROUGH_PREFIX!r}")
        if name in options:
            raise ValueError(f"{PASSTHROUGH_PREFIX}{name} given twice")
        options[name] = value
    return options, rest


def _normalize_flag(key: str) -> str:
    if not isinstance(key, str) or not key or key.startswith("-") or any(c.isspace() for c in key):
        raise ValueError(f"passthrough key must be a flag name without leading dashes, got {key!r}")
    return key.replace("_", "-")


def _is_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value
