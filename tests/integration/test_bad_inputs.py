"""Bad inputs, misbehaving plug-ins and signals, by class (issue 16): each ends in a counted
recovery or one clear line, never a crash, a spin, a hang or a traceback.

Classes, and how each is checked:
- user errors found before anything starts: exit 2, one line naming the flag, no process started
  (run in this process through ``runtime.launch.main``: nothing starts, so nothing is faked);
- user errors found while building (lengths against the model's context, a plug-in that does not
  import or whose factory raises): the same, from a real launcher process;
- bad values at run time (prompts longer than the context, huge or non-finite rewards, a sink that
  raises): counted and the run completes, its ledger balanced;
- a failure on every request (a reward that always raises, engines refusing every request), a
  trainer killed from outside: exit 1 and one line naming the cause and its first error;
- signals (SIGTERM, Ctrl-C to the process group): exit 143 / 130, an ``interrupted`` summary, the
  weights directory removed, no process left;
- a loop blocked by a plug-in, and a stop that never ends (``runtime.run_guard``): forced with
  the same record, one line, no process left (tests/integration/guarded_loop.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runtime import launch
from runtime.metrics import read_metrics
from tests.integration.runs import ROOT, engines_of

PROG = "python -m runtime.launch: error: "
TINY = ["--num-rollout", "3", "--eval-num-prompts", "20", "--eval-interval", "0", "--progress", "off"]
PLUGINS = "tests.integration.bad_plugins"


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def last_line(err: str) -> str:
    assert "Traceback" not in err and "never retrieved" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def balanced(ledger: dict) -> bool:
    return ledger["admitted"] == ledger["trained"] + sum(ledger["dropped"].values()) + ledger["in_flight"] \
        and ledger["duplicates"] == 0


# -- before anything starts -------------------------------------------------------------------------
def _checkpoint(root: Path, *, without: str) -> Path:
    """A --save directory laid out as runtime.checkpoint writes it, less one file."""
    step = root / "step4"
    (step / "model").mkdir(parents=True)
    for name in ("state.msgpack", "trainer.pt", "model/config.json", "model/model.safetensors"):
        if name != without:
            (step / name).write_bytes(b"{}")
    (root / "latest").write_text("step4")
    return root


def _model_dir(root: Path, *files: str) -> Path:
    root.mkdir()
    for name in files:
        (root / name).write_text("{}")
    return root


def _toml(tmp: Path, text: str) -> list[str]:
    path = tmp / "bad.toml"
    path.write_text(text)
    return ["--config", str(path)]


def _busy_dir(tmp: Path) -> Path:
    (tmp / "old").mkdir()
    (tmp / "old" / "metrics.jsonl").write_text('{"step": 1}\n')
    return tmp / "old"


START_ERRORS = {  # id: (argv for tmp_path, the flag named, a phrase of the reason)
    "run-dir-is-a-file": (lambda t: ["--run-dir", str(t / "f")], "--run-dir", "is not a directory"),
    "run-dir-not-writable": (lambda t: ["--run-dir", "/proc/asyncrl-run"], "--run-dir", "cannot write"),
    "run-dir-holds-a-run": (lambda t: ["--run-dir", str(_busy_dir(t))], "--run-dir", "--overwrite"),
    "save-not-writable": (lambda t: ["--save", "/proc/asyncrl-ckpt"], "--save", "cannot write"),
    "hf-checkpoint-missing": (lambda t: ["--hf-checkpoint", str(t / "nope")], "--hf-checkpoint", "not a directory"),
    "hf-checkpoint-empty": (lambda t: ["--hf-checkpoint", str(_model_dir(t / "m"))], "--hf-checkpoint",
                            "no config.json"),
    "hf-checkpoint-no-weights": (lambda t: ["--hf-checkpoint", str(_model_dir(t / "m", "config.json"))],
                                 "--hf-checkpoint", "no weights"),
    "engine-host-unresolvable": (lambda t: ["--engine-host", "no-such-host.invalid"], "--engine-host",
                                 "cannot resolve"),
    "engine-host-not-here": (lambda t: ["--engine-host", "192.0.2.1"], "--engine-host", "cannot bind"),
    "load-nothing-saved": (lambda t: ["--load", str(t)], "--load", "no checkpoint"),
    "load-no-optimizer": (lambda t: ["--load", str(_checkpoint(t / "c", without="trainer.pt"))], "--load",
                          "incomplete: no trainer.pt"),
    "load-no-weights": (lambda t: ["--load", str(_checkpoint(t / "c", without="model/model.safetensors"))],
                        "--load", "incomplete: no model/*.safetensors"),
    "toml-section-not-a-table": (lambda t: _toml(t, "rollout = 3\n"), "[rollout]", "must be a table"),
    "toml-value-wrong-type": (lambda t: _toml(t, '[rollout]\nrollout_batch_size = "x"\n'), "--rollout-batch-size",
                              "Expected `int`"),
    "toml-list-expected": (lambda t: _toml(t, "[grpo]\ntis_clip_by_staleness = 2.0\n"), "--tis-clip-by-staleness",
                           "Expected `array`"),
    "toml-table-wrong-shape": (lambda t: _toml(t, "[engine]\nsglang_args = {a = [1]}\n"), "--sglang-args",
                               "Expected"),
    "toml-agents-not-tables": (lambda t: _toml(t, "[agents]\nx = 1\n"), "[agents.x]", "must be a table"),
    "toml-episodes-not-a-table": (lambda t: _toml(t, "episodes = 3\n[agents.a]\n"), "[episodes]",
                                  "must be a table"),
}
if __import__("importlib").util.find_spec("sglang") is None:
    START_ERRORS["engine-sglang-not-installed"] = (lambda t: ["--engine", "sglang"], "--engine", "not installed")


@pytest.mark.parametrize("case", START_ERRORS)
def test_a_user_error_is_one_line_and_exit_2_before_anything_starts(case, tmp_path, capsys):
    argv_of, flag, phrase = START_ERRORS[case]
    (tmp_path / "f").write_text("")
    argv = ["--run-dir", str(tmp_path / "run"), *argv_of(tmp_path), *TINY]
    children = psutil.Process().children(recursive=True)
    try:
        code = launch.main(argv)
    except SystemExit as e:  # argparse and config errors exit from the parser
        code = e.code
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert re.match(r"python -m runtime\.launch: error: ", line) and flag in line and phrase in line, line
    assert psutil.Process().children(recursive=True) == children  # nothing was started
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_run_dir_is_reused_only_with_overwrite_or_load(tmp_path):
    from runtime.config import ConfigError
    from runtime.preflight import check_run_dir

    old = _busy_dir(tmp_path)
    (old / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        check_run_dir(old, resuming=False, overwrite=False)
    check_run_dir(old, resuming=True, overwrite=False)  # a resumed run continues its record
    assert (old / "metrics.jsonl").exists()
    check_run_dir(old, resuming=False, overwrite=True)  # the old run's record goes, nothing else
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]


# -- found while building: real launcher processes, started together -------------------------------
BUILD_ERRORS = {  # id: (flags, the flag named, a phrase of the reason)
    "response-longer-than-context": (["--rollout-max-response-len", "100"], "--rollout-max-response-len",
                                     "exceed the model's context of 64 tokens"),
    "eval-response-longer-than-context": (["--eval-max-response-len", "100"], "--eval-max-response-len",
                                          "exceed the model's context of 64 tokens"),
    "reward-with-a-syntax-error": (["--custom-rm-path", "broken_reward:score"], "--custom-rm-path",
                                   "SyntaxError"),
    "sink-factory-raises": (["--metrics-sink", f"{PLUGINS}:sink_factory_that_raises"], "--metrics-sink",
                            "raised PermissionError: no API key"),
}


@pytest.fixture(scope="module")
def build_errors(tmp_path_factory):
    """Each BUILD_ERRORS case as ``python -m runtime.launch`` (all at once: they only start up)."""
    tmp = tmp_path_factory.mktemp("build-errors")
    (tmp / "broken_reward.py").write_text("def score(prompt, sample)\n    return 1.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}
    procs = {case: subprocess.Popen([sys.executable, "-m", "runtime.launch", "--run-dir", str(tmp / case),
                                     *TINY, *flags], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
             for case, (flags, _, _) in BUILD_ERRORS.items()}
    out = {case: (p.communicate(timeout=180)[1], p.returncode, tmp / case) for case, p in procs.items()}
    return out


@pytest.mark.parametrize("case", BUILD_ERRORS)
def test_a_user_error_found_while_building_is_one_line_and_exit_2(case, build_errors):
    err, code, run_dir = build_errors[case]
    _, flag, phrase = BUILD_ERRORS[case]
    line = last_line(err)
    assert code == 2, err[-3000:]
    assert line.startswith(PROG) and flag in line and phrase in line, line
    assert len(err.strip().splitlines()) <= 2  # "run directory: ..." and the error
    assert not any(run_dir.iterdir())  # left as it was: the corrected command can use it
    assert not engines_of(run_dir)


# -- whole runs --------------------------------------------------------------------------------------
def run_launcher(run_dir: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *TINY, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bad_values_are_counted_and_the_run_goes_on(tmp_path):
    """Three faults in one short run: prompts longer than the context (copy_long's up to 10 tokens
    + 10 new in a context of 16), rewards of 1e300 / nan / -inf on three samples of every group,
    and a metrics sink whose every write raises."""
    run_dir = tmp_path / "r"
    proc = run_launcher(run_dir, "--recipe", "copy_long", "--max-position-embeddings", "16",
                        "--custom-rm-path", f"{PLUGINS}:huge_or_not_finite",
                        "--metrics-sink", f"{PLUGINS}:sink_that_raises")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith("done: 3 steps")
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger, counters = summary["ledger"], summary["counters"]
    assert balanced(ledger) and summary["status"] == "completed"
    assert ledger["dropped"]["prompt_too_long"] > 0 and counters["prompts_too_long"] >= ledger["dropped"][
        "prompt_too_long"]
    assert counters["reward_error"] >= 3 * ledger["trained"]  # every scored group had its three
    assert all(line["reward/mean"] is not None for line in read_metrics(run_dir / "metrics.jsonl"))
    assert proc.stderr.count("metrics sink _Sink raised OSError: metrics server unreachable; disabled") == 1
    assert "prompt_too_long" not in proc.stderr or "Traceback" not in proc.stderr
    assert not engines_of(run_dir)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, copy_task):
    """A checkpoint for another tokenizer: 4 token ids, below the recipe's prompts' ids."""
    from policies.model import qwen3_config, write_random_checkpoint

    tok = copy_task.tokenizer
    config = qwen3_config(vocab_size=4, num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1,
                          ffn_hidden_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("vocab4") / "model", config, tok, seed=0)


EVERY_REQUEST_FAILS = {  # id: (flags, what the line says, its first error)
    "reward-always-raises": (lambda m: ["--custom-rm-path", f"{PLUGINS}:always_raises"],
                             r"\d+ reward calls failed in a row", "ConnectionError: reward server unavailable"),
    "engines-refuse-every-request": (lambda m: ["--hf-checkpoint", str(m)],
                                     r"(\d+ samples failed on the engines in a row|all \d+ requests failed)",
                                     "token id outside [0, 4)"),
}


@pytest.mark.parametrize("case", [
    "reward-always-raises",
    pytest.param("engines-refuse-every-request", marks=pytest.mark.slow),  # the same budget, the engine's cause
])
def test_a_failure_on_every_request_ends_the_run_with_its_cause(case, tmp_path, small_vocab_model):
    flags_of, what, first = EVERY_REQUEST_FAILS[case]
    run_dir = tmp_path / "r"
    proc = run_launcher(run_dir, "--max-consecutive-failures", "32", *flags_of(small_vocab_model),
                        "--num-rollout", "1000")
    line = last_line(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.match(rf"run failed: (evaluation at version 0: )?{what}.*; first error: .*", line), line
    assert first in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0 and balanced(summary["ledger"])
    assert not engines_of(run_dir)


def start(run_dir: Path, *flags: str, **popen) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *TINY, *flags],
                            cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def wait_for_step(proc: subprocess.Popen[str], run_dir: Path, timeout: float = 300) -> list[psutil.Process]:
    """Until the run's first learner step; then its processes (engines, the trainer)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step (exit {proc.returncode}):\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return psutil.Process(proc.pid).children(recursive=True)


def assert_gone(processes: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_a_killed_trainer_ends_the_run_with_one_line(tmp_path):
    run_dir = tmp_path / "r"
    proc = start(run_dir, "--num-rollout", "1000")
    try:
        children = wait_for_step(proc, run_dir)
        [trainer] = [c for c in children if "policies.trainer_process" in " ".join(c.cmdline())]
        trainer.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert re.fullmatch(rf"run failed: actor 'learner' lost its trainer: trainer process {trainer.pid} died "
                        r"\(exit code -9\)", last_line(err)), err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert_gone(children)


@pytest.mark.parametrize("sig, to, code", [
    # GNU timeout sends its signal to the command and then to the command's process group: the
    # launcher gets it twice within microseconds, which is one request to stop, not two
    pytest.param(signal.SIGTERM, "twice", 143, id="sigterm-as-timeout-sends-it"),
    pytest.param(signal.SIGTERM, "process", 143, id="sigterm", marks=pytest.mark.slow),
    # SIGINT to the launcher alone is test_launch.py's; to the whole group on -m slow (CI time)
    pytest.param(signal.SIGINT, "group", 130, id="ctrl-c-to-the-group", marks=pytest.mark.slow),
])
def test_a_signal_ends_the_run_cleanly(sig, to, code, tmp_path):
    run_dir = tmp_path / "r"
    proc = start(run_dir, "--num-rollout", "1000", start_new_session=True)
    try:
        children = wait_for_step(proc, run_dir)
        weights = re.search(r"weights directory: (\S+)", (run_dir / "run.log").read_text()).group(1)
        assert Path(weights).is_dir()
        if to == "group":
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the engines and the trainer get it too
        else:
            proc.send_signal(sig)  # as systemd, Slurm and Kubernetes do
            if to == "twice":
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    assert last_line(err) == f"interrupted ({sig.name}); partial record in {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted ({sig.name})"
    assert balanced(summary["ledger"])
    assert not Path(weights).exists()
    assert_gone(children)


# -- a blocked loop and a stop that never ends: forced ---------------------------------------------
def guarded(mode: str, record: Path, *extra: str) -> tuple[subprocess.Popen[str], int, Path]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.guarded_loop", mode, str(record), *extra],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "ready", proc.communicate(timeout=10)
    return proc, int(ready[1]), Path(ready[2])


@pytest.mark.parametrize("mode, signals, code, line", [
    ("blocked", [signal.SIGINT], 130,
     r"interrupted \(SIGINT\); the event loop was blocked at .*guarded_loop\.py:\d+ in blocked: forced exit"),
    ("blocked", [signal.SIGTERM], 143,
     r"interrupted \(SIGTERM\); the event loop was blocked at .*guarded_loop\.py:\d+ in blocked: forced exit"),
    ("stubborn", [signal.SIGINT, signal.SIGINT], 130, r"interrupted \(SIGINT, a second time\): forced exit"),
], ids=["blocked-sigint", "blocked-sigterm", "second-signal"])
def test_a_signal_ends_a_run_whose_loop_cannot_stop(mode, signals, code, line, tmp_path):
    proc, child, scratch = guarded(mode, tmp_path / "record.json")
    try:
        t0 = time.monotonic()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.5)  # two separate signals, as a user pressing Ctrl-C twice
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert time.monotonic() - t0 < 15
    assert re.fullmatch(line, one_line(err)), err
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "interrupted"
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert not scratch.exists()


def test_a_loop_blocked_past_the_stall_timeout_is_ended_with_where_it_was(tmp_path):
    proc, child, scratch = guarded("blocked", tmp_path / "record.json", "2")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert re.fullmatch(r"run failed: the event loop was blocked for [23]s \(--stall-timeout\) at "
                        r".*guarded_loop\.py:\d+ in blocked", lines[-1]), err
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "failed" and "--stall-timeout" in record["error"]
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert not scratch.exists()
