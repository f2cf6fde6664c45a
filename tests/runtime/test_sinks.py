"""Metrics sinks: one write fans out to metrics.jsonl and every sink; optional packages fail early."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from runtime.config import ConfigError, LogConfig
from runtime.metrics import MetricsLog, read_metrics
from runtime.sinks import open_sinks
from tests.runtime.short_run import HAS_TENSORBOARD, ROOT, STEPS, short_run


class ListSink:
    """A user sink: keeps what it was given."""

    def __init__(self, run_dir, config):
        self.run_dir, self.config = run_dir, config
        self.rows, self.closed = [], False

    def write(self, step, metrics):
        self.rows.append((step, metrics))

    def close(self):
        self.closed = True


def make_sink(*, run_dir, config):  # the --metrics-sink factory
    return ListSink(run_dir, config)


def test_one_write_reaches_the_file_and_every_sink(tmp_path):
    a, b = ListSink(tmp_path, {}), ListSink(tmp_path, {})
    log = MetricsLog(tmp_path / "m.jsonl", [a, b])
    log.write({"step": 1, "reward/mean": 0.5, "staleness/max": 2, "sync/version": None, "note": "x",
               "bad": float("nan")})
    log.close()
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "reward/mean": 0.5, "staleness/max": 2,
                                                   "sync/version": None, "note": "x", "bad": None}]
    assert a.rows == b.rows == [(1, {"reward/mean": 0.5, "staleness/max": 2.0})]  # finite numbers only
    assert a.closed and b.closed


def test_a_sink_that_fails_to_close_is_warned_about_and_does_not_keep_the_others_open(tmp_path, caplog):
    class Broken(ListSink):
        def close(self):
            raise OSError("disk gone")

    ok = ListSink(tmp_path, {})
    log = MetricsLog(tmp_path / "m.jsonl", [Broken(tmp_path, {}), ok])
    log.close()  # issue 16: a sink is a plug-in; its failure is a warning, never the run's end
    assert ok.closed
    assert "metrics sink Broken raised on close: OSError: disk gone" in caplog.text


def test_a_sink_that_raises_is_disabled_with_a_warning_and_the_others_go_on(tmp_path, caplog):
    class Raising(ListSink):
        def write(self, step, metrics):
            raise RuntimeError("dashboard down")

    bad, ok = Raising(tmp_path, {}), ListSink(tmp_path, {})
    log = MetricsLog(tmp_path / "m.jsonl", [bad, ok])
    for step in (1, 2, 3):
        log.write({"step": step, "reward/mean": 0.5})
    log.close()
    assert [step for step, _ in ok.rows] == [1, 2, 3] and bad.closed
    assert len(read_metrics(tmp_path / "m.jsonl")) == 3
    assert caplog.text.count("metrics sink Raising raised RuntimeError: dashboard down; disabled") == 1


def test_a_sink_whose_write_blocks_skips_lines_and_never_blocks_the_writer(tmp_path, monkeypatch):
    import threading

    from runtime import sink_thread

    monkeypatch.setattr(sink_thread, "QUEUE_LINES", 4)
    monkeypatch.setattr(sink_thread, "CLOSE_S", 0.2)
    release = threading.Event()

    class Blocking(ListSink):
        def write(self, step, metrics):
            release.wait()

    log = MetricsLog(tmp_path / "m.jsonl", [Blocking(tmp_path, {})])
    for step in range(1, 101):
        log.write({"step": step, "reward/mean": 0.5})  # returns at once although the sink is stuck
    [worker] = log.sinks
    assert worker.skipped >= 100 - 4 - 1
    log.close()  # bounded: the stuck sink is left behind after CLOSE_S
    assert len(read_metrics(tmp_path / "m.jsonl")) == 100
    release.set()


def test_a_user_sink_is_loaded_from_its_module_function_path(tmp_path):
    sinks = open_sinks(LogConfig(metrics_sink="tests.runtime.test_sinks:make_sink"), run_dir=tmp_path,
                       config={"run": {"seed": 1}})
    assert len(sinks) == 1 and sinks[0].run_dir == tmp_path and sinks[0].config == {"run": {"seed": 1}}
    with pytest.raises(ConfigError, match="--metrics-sink"):
        open_sinks(LogConfig(metrics_sink="tests.runtime.test_sinks:nope"), run_dir=tmp_path, config={})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_use_wandb_without_the_package_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(tmp_path / "r"), "--use-wandb"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--use-wandb" in proc.stderr and "wandb" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything started


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_sink_writes_a_local_run(tmp_path):
    sinks = open_sinks(LogConfig(use_wandb=True, wandb_mode="offline"), run_dir=tmp_path, config={"a": {"b": 1}})
    sinks[0].write(1, {"reward/mean": 0.5})
    sinks[0].close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
def test_tensorboard_files_of_a_real_run_read_back_with_tensorboards_reader():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = short_run()
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    lines = read_metrics(run_dir / "metrics.jsonl")
    reward = acc.Scalars("reward/mean")
    assert [e.step for e in reward] == list(range(1, STEPS + 1))
    assert [e.value for e in reward] == pytest.approx([line["reward/mean"] for line in lines], rel=1e-6)
    assert {"staleness/mean", "learner/wait_frac", "buffer/groups", "eval/reward"} <= set(acc.Tags()["scalars"])
