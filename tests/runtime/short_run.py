"""One short real training run shared by the trace, report and sink tests (a run costs ~25 s).

Real engine subprocesses, real HTTP, the real learner: ``python -m runtime.launch`` as a user runs
it, with TensorBoard on when the package is installed. Made once per test session, on first use.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
FLAGS = ["--num-rollout", str(STEPS), "--eval-interval", "5", "--eval-num-prompts", "30", "--progress", "lines"]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@functools.cache
def short_run() -> Path:
    parent = Path(tempfile.mkdtemp(prefix="asyncrl-short-run-"))
    atexit.register(shutil.rmtree, parent, True)
    run_dir = parent / "run"
    flags = [*FLAGS, *(["--use-tensorboard"] if HAS_TENSORBOARD else [])]
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(run_dir), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
