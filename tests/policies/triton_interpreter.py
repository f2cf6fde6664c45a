"""Run a Triton kernel's check on CPU under Triton's interpreter, in a child process.

TRITON_INTERPRET=1 is read when a kernel module is first imported, hence the child. The child's
code prints "ok" last when every check passed. Used by test_triton_decode.py and test_triton_sample.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# the interpreter converts its scalars with int() on a 1-element array, which NumPy 2 refuses
PATCH = textwrap.dedent(
    """
    import triton.runtime.interpreter as interpreter

    _patch = interpreter._patch_lang_tensor
    def _patched(tensor):
        _patch(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
    interpreter._patch_lang_tensor = _patched
    """
)


def run_interpreted(code: str, timeout_s: float = 280) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    source = PATCH + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
