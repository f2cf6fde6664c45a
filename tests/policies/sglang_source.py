"""Read the source of the newest sglang release without installing, importing or running it.

SGLang needs a GPU and pins its own torch, so it cannot be installed on the project's CPU
machines; its wheel, though, is a zip of Python files. `ensure_wheel` downloads it once with
`pip download sglang --no-deps --only-binary=:all:` into ~/.cache/asyncrl/sglang/ and reuses
any wheel already there (delete that folder to check a newer release). `SglangSource` reads
files straight out of the zip and parses them with `ast`; sglang_api.py (HTTP routes and their
request models, dataclass/Struct fields, CLI flags) and sglang_answers.py (dict keys written into
a response) pull out the facts the contract tests (test_sglang_*.py) compare the client with.
Every fact carries its "file:line" so a failure points at the sglang source.

When the wheel can be neither found nor downloaded, `ensure_wheel` raises SglangUnavailable,
whose message names the command that failed; the tests skip with it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "asyncrl" / "sglang"
DOWNLOAD_TIMEOUT_S = 600

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SERVER_ARGS = "sglang/srt/server_args.py"
SAMPLING_PARAMS = "sglang/srt/sampling/sampling_params.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
DETOKENIZER_MANAGER = "sglang/srt/managers/detokenizer_manager.py"
SCHEDULE_BATCH = "sglang/srt/managers/schedule_batch.py"  # BaseFinishReason.to_json
ARG_FIELDS_DIR = "sglang/srt/arg_groups/fields/"  # newer releases declare server flags here
API_CONTRACT = "sglang/api/v1/api_types.py"  # newer releases gate /generate bodies with it
WEIGHT_UPDATER = "sglang/srt/managers/scheduler_components/weight_updater.py"  # 0.5.23: sessions


class SglangUnavailable(RuntimeError):
    """No sglang wheel in the cache and the download failed (e.g. offline)."""


# ---- obtaining the wheel ----------------------------------------------------------------------


def download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "sglang", "--no-deps", "--only-binary=:all:", "-d", str(dest)]


def cached_wheel(cache_dir: Path = CACHE_DIR) -> Path | None:
    """The newest sglang wheel in `cache_dir`, or None."""
    wheels = list(cache_dir.glob("sglang-*.whl"))
    if not wheels:
        return None
    return max(wheels, key=lambda p: (_version_key(p.name.split("-")[1]), p.stat().st_mtime))


def ensure_wheel(cache_dir: Path = CACHE_DIR) -> Path:
    """A cached sglang wheel, downloading the newest one first if the cache has none.

    pip writes into a private temporary folder that is moved into place only when complete, so
    an interrupted download never looks like a cached wheel (and two test processes racing
    each end up with one whole file).
    """
    if (wheel := cached_wheel(cache_dir)) is not None:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    cmd = download_command(tmp)
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SglangUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise SglangUnavailable(f"`{' '.join(cmd)}` exited with {proc.returncode}: {tail}")
        got = list(tmp.glob("sglang-*.whl"))
        if not got:
            raise SglangUnavailable(f"`{' '.join(cmd)}` produced no sglang wheel in {tmp}")
        final = cache_dir / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version_key(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (0, Version(version))
    except Exception:  # noqa: BLE001 - an odd file name sorts first, by mtime
        return (-1, version)


# ---- reading the source -----------------------------------------------------------------------


@dataclass
class SglangSource:
    """The Python files of one sglang wheel, read and parsed on demand (parse results cached)."""

    wheel: Path
    _zip: zipfile.ZipFile = field(init=False, repr=False)
    _trees: dict[str, ast.Module] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.wheel)
        except zipfile.BadZipFile:
            raise RuntimeError(f"{self.wheel} is not a valid wheel; delete it to download a fresh one") from None
        self.names = set(self._zip.namelist())

    @property
    def version(self) -> str:
        for name in self.names:
            if name.endswith(".dist-info/METADATA"):
                match = re.search(r"^Version:\s*(\S+)", self.read(name), re.M)
                if match:
                    return match.group(1)
        return self.wheel.name.split("-")[1]

    def has(self, path: str) -> bool:
        return path in self.names

    def read(self, path: str) -> str:
        if path not in self.names:
            raise FileNotFoundError(f"{path} is not in {self.wheel.name}")
        return self._zip.read(path).decode("utf-8")

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.read(path), filename=path)
        return self._trees[path]

    def module_file(self, module: str) -> str | None:
        """`sglang.srt.x` → the file in the wheel that defines it, or None."""
        base = module.replace(".", "/")
        for candidate in (base + ".py", base + "/__init__.py"):
            if candidate in self.names:
                return candidate
        return None

    def close(self) -> None:
        self._zip.close()


def where(path: str, node: ast.AST) -> str:
    return f"{path}:{getattr(node, 'lineno', '?')}"
