"""`--engine sglang` on the command line and in TOML: the flags, the defaults it changes, what it
refuses, and the process factory it builds (runtime/config/compute.py EngineConfig, runtime/cli.py)."""

from __future__ import annotations

import tomllib

import pytest

from policies.engine.process import EngineProcess
from policies.engine.sglang_process import SGLangProcess, engine_process, with_engine
from runtime import cli
from runtime.config import Config, to_toml_dict


def resolve(*argv: str) -> Config:
    return cli.resolve(list(argv))


def refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line (and status 2) a bad command line exits with."""
    with pytest.raises(SystemExit) as exit_:
        resolve(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip()


def test_passthrough_flags_and_sglang_defaults():
    cfg = resolve("--engine", "sglang", "--sglang-mem-fraction-static", "0.8", "--lr", "5e-4",
                  "--sglang-enable-metrics", "--sglang-chunked-prefill-size=512")
    assert cfg.engine.engine == "sglang" and cfg.engine.engine_host == "127.0.0.1"
    assert cfg.engine.sglang_args == {"mem-fraction-static": "0.8", "enable-metrics": True,
                                      "chunked-prefill-size": "512"}
    assert cfg.optimizer.lr == 5e-4  # the runtime's own flags around them still parse
    # SGLang dates whole answers per pause: requests end at a sync and are resumed (pause mode abort)
    assert cfg.async_.partial_rollout_mode == "recompute" and cfg.async_.pause_mode == "abort"
    assert cfg.placement.weight_transport == "auto"  # NCCL on GPUs, inside SGLang's update session
    embedded = resolve()
    assert embedded.engine.engine == "embedded" and embedded.async_.pause_mode == "in_place"
    assert embedded.placement.weight_transport == "auto"


def test_toml_table_and_flags_merge_and_round_trip(tmp_path):
    (tmp_path / "c.toml").write_text('[engine]\nengine = "sglang"\n'
                                     'sglang_args = {mem-fraction-static = 0.7, skip-server-warmup = true}\n')
    cfg = resolve("--config", str(tmp_path / "c.toml"), "--sglang-mem-fraction-static", "0.8",
                  "--sglang-max-prefill-tokens", "4096")
    assert cfg.engine.sglang_args == {"mem-fraction-static": "0.8", "skip-server-warmup": True,
                                      "max-prefill-tokens": "4096"}
    written = cli.dumps_toml(to_toml_dict(cfg))  # what config.toml in the run directory holds
    (tmp_path / "again.toml").write_text(written)
    assert tomllib.loads(written)["engine"]["sglang_args"] == cfg.engine.sglang_args
    assert resolve("--config", str(tmp_path / "again.toml")) == cfg


@pytest.mark.parametrize(("argv", "line"), [
    (["--engine", "sglang", "--partial-rollout-mode", "keep"], "--partial-rollout-mode: keep holds requests"),
    (["--sglang-mem-fraction-static", "0.8"], "--sglang-mem-fraction-static: SGLang flags need --engine sglang"),
    (["--engine", "sglang", "--sglang-port", "30000"], "--sglang-port: SGLang flag --port"),
    (["--engine", "sglang", "--sglang-tp-size", "2"], "--sglang-tp-size: SGLang flag --tp-size"),
    (["--engine", "sglang", "--sglang-dtype", "half"], "--sglang-dtype: SGLang flag --dtype"),
    (["--engine", "sglang", "--sglang-x", "1", "--sglang-x", "2"], "--sglang-x given twice"),
    (["--engine", "sglang", "--sglang-mem_fraction_static", "0.7", "--sglang-mem-fraction-static", "0.8"],
     "both name --mem-fraction-static"),
    (["--engine", "vllm"], "argument --engine: invalid choice"),
])
def test_refusals_are_one_line(capsys, argv, line):
    err = refusal(capsys, *argv)
    assert line in err and len(err.splitlines()) == 1, err


def test_factory_builds_the_chosen_process(tmp_path):
    common = dict(log_path=tmp_path / "e.log", torch_threads=1, max_running_requests=8, weight_version="0",
                  dtype="float32")
    sglang = with_engine(None, engine="sglang", host="127.0.0.1", passthrough={"enable-metrics": True})
    assert isinstance(sglang(0, "/m", **common), SGLangProcess)
    embedded = with_engine(None, engine="embedded", host="127.0.0.1")(0, "/m", **common)
    assert type(embedded) is EngineProcess
    # a backend's hosts get the choice as keywords and end in engine_process
    seen = {}

    def hosts(index, model_path, **kwargs):  # noqa: ANN001, ANN202
        seen.update(kwargs)
        return engine_process(model_path, **kwargs)

    assert isinstance(with_engine(hosts, engine="sglang", host="0.0.0.0")(1, "/m", **common), SGLangProcess)
    assert seen["engine"] == "sglang" and seen["host"] == "0.0.0.0" and seen["passthrough"] == {}
    with pytest.raises(ValueError, match="set by the runtime"):  # refused when built, not at a restart
        SGLangProcess("/m", passthrough={"port": "1"}, **common)
