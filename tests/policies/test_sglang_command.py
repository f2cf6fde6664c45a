"""The SGLang launch command builder and its flags (policies/engine/sglang_launch.py), every flag
it emits checked against the server flags of the newest sglang release; and the cache of that
release's wheel (sglang_source.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sglang_api
import sglang_source as sgl

from policies.engine.sglang_launch import RUNTIME_OWNED_FLAGS, parse_sglang_passthrough, sglang_command

pytestmark = pytest.mark.timeout(120)


# ---- the wheel cache -----------------------------------------------------------------------------


def test_a_cached_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    (tmp_path / "sglang-0.5.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "sglang-0.5.10-py3-none-any.whl").write_bytes(b"")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a wheel is cached")

    monkeypatch.setattr(sgl.subprocess, "run", no_pip)
    assert sgl.ensure_wheel(tmp_path).name == "sglang-0.5.10-py3-none-any.whl"


def test_a_failed_download_names_the_command(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies sglang")

    monkeypatch.setattr(sgl.subprocess, "run", offline)
    with pytest.raises(
        sgl.SglangUnavailable, match=r"pip download sglang --no-deps --only-binary=:all:.*exited with 1"
    ):
        sgl.ensure_wheel(tmp_path)
    assert not list(tmp_path.iterdir()), "a failed download must leave nothing behind"


# ---- launching real SGLang -----------------------------------------------------------------------


def test_sglang_command_defaults():
    assert sglang_command(model_path="/m", port=30000, python="py") == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port", "30000",
        "--tp-size", "1",
    ]  # fmt: skip
    assert sglang_command(model_path="/m", port=1)[0] == sys.executable


def test_sglang_command_passthrough_and_api_key():
    cmd = sglang_command(
        model_path="/m",
        port=30001,
        host="0.0.0.0",
        tp_size=2,
        api_key="k",
        passthrough={
            "mem-fraction-static": "0.7",
            "skip-server-warmup": True,
            "enable-foo": False,
            "chunked_prefill_size": 512,
        },
        python="py",
    )
    assert cmd == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "0.0.0.0", "--port", "30001",
        "--tp-size", "2", "--api-key", "k", "--mem-fraction-static", "0.7", "--skip-server-warmup",
        "--chunked-prefill-size", "512",
    ]  # fmt: skip


@pytest.mark.parametrize("key", sorted(RUNTIME_OWNED_FLAGS | {"model_path", "api_key", "tp_size"}))
def test_sglang_command_refuses_runtime_owned_flags(key):
    with pytest.raises(ValueError, match="set by the runtime"):
        sglang_command(model_path="/m", port=1, passthrough={key: "x"})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(port=0), ValueError),
        (dict(port=70000), ValueError),
        (dict(tp_size=0), ValueError),
        (dict(api_key=""), ValueError),
        (dict(passthrough={"--mem-fraction-static": "0.7"}), ValueError),
        (dict(passthrough={"": "x"}), ValueError),
        (dict(passthrough={"mem_fraction_static": "0.7", "mem-fraction-static": "0.8"}), ValueError),
        (dict(passthrough={"mem-fraction-static": ["0.7"]}), TypeError),
    ],
)
def test_sglang_command_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        sglang_command(**{"model_path": "/m", "port": 1, **kwargs})


def test_parse_sglang_passthrough():
    argv = [
        "--steps", "3", "--sglang-mem-fraction-static", "0.7", "--sglang-skip-server-warmup", "--out", "x",
        "--sglang-weight-version=0", "--sglang-random-seed", "-1", "--sglang-json-model-override-args=-x",
        "--sglang-enable-metrics",
    ]  # fmt: skip
    options, rest = parse_sglang_passthrough(argv)
    assert options == {
        "mem-fraction-static": "0.7",
        "skip-server-warmup": True,
        "weight-version": "0",
        "random-seed": "-1",
        "json-model-override-args": "-x",
        "enable-metrics": True,
    }
    assert rest == ["--steps", "3", "--out", "x"]
    assert parse_sglang_passthrough(["a", "--sglang-x", "--", "--sglang-y", "1"]) == (
        {"x": True},
        ["a", "--", "--sglang-y", "1"],
    )
    assert parse_sglang_passthrough(["--sglang-x="]) == ({"x": ""}, [])
    assert parse_sglang_passthrough([]) == ({}, [])
    for bad in (["--sglang-", "1"], ["--sglang-=1"], ["--sglang-x", "1", "--sglang-x=2"]):
        with pytest.raises(ValueError):
            parse_sglang_passthrough(bad)


def test_passthrough_round_trip():
    options, rest = parse_sglang_passthrough(
        ["run", "--sglang-mem-fraction-static", "0.7", "--sglang-skip-server-warmup"]
    )
    cmd = sglang_command(model_path="/m", port=5, passthrough=options, python="py")
    assert cmd[-3:] == ["--mem-fraction-static", "0.7", "--skip-server-warmup"] and rest == ["run"]
    # a bare flag followed by a positional argument takes it as its value: documented, so tested
    assert parse_sglang_passthrough(["--sglang-skip-server-warmup", "run"]) == ({"skip-server-warmup": "run"}, [])
    with pytest.raises(ValueError, match="--port"):
        sglang_command(model_path="/m", port=5, passthrough=parse_sglang_passthrough(["--sglang-port=1"])[0])


def test_emitted_flags_are_sglang_server_flags(src):
    """Every flag sglang_command emits (its own and the PROTOCOL.md passthrough examples) is a
    `sglang.launch_server` argument, taking a value exactly when SGLang's takes one."""
    assert src.has("sglang/launch_server.py"), "python -m sglang.launch_server would not exist"
    cmd = sglang_command(
        model_path="/m",
        port=30000,
        api_key="k",
        device="cuda",
        dtype="bfloat16",
        max_running_requests=512,
        weight_version="0",
        passthrough={"mem-fraction-static": "0.7", "skip-server-warmup": True, "enable-metrics": True},
        python="py",
    )
    flags = sglang_api.server_flags(src)
    args = cmd[3:]
    emitted = [
        (a, i + 1 < len(args) and not args[i + 1].startswith("--")) for i, a in enumerate(args) if a.startswith("--")
    ]
    assert {a for a, _ in emitted} == {
        "--model-path", "--host", "--port", "--tp-size", "--api-key", "--mem-fraction-static", "--skip-server-warmup",
        "--weight-version", "--device", "--dtype", "--max-running-requests", "--enable-metrics",
    }  # fmt: skip
    problems = []
    for flag, has_value in emitted:
        if flag not in flags:
            problems.append(f"{flag} is not a server flag of sglang {src.version}")
        elif flags[flag][0] is not None and flags[flag][0] != has_value:
            kind = "takes a value" if flags[flag][0] else "is a bare flag"
            problems.append(f"{flag} {kind} in SGLang ({flags[flag][1]})")
    assert not problems, "\n".join(problems)
    # the runtime-owned names that SGLang knows are refused; the rest are defensive spellings
    assert {f"--{n}" for n in RUNTIME_OWNED_FLAGS} & set(flags) >= {
        "--model-path", "--model", "--host", "--port", "--tp-size", "--tensor-parallel-size", "--api-key",
        "--device", "--dtype", "--max-running-requests", "--weight-version",
    }  # fmt: skip
