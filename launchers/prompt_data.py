"""Prompt files (Miles's ``--prompt-data``): JSONL or Parquet rows read, checked and put in epoch order.

A row is a JSON object (a JSONL line, a Parquet row) with the prompt under ``input_key`` (a string,
or a list of ``{role, content}`` messages), an optional label under ``label_key`` (a string or a
number, handed to the reward as text) and an optional metadata object under ``metadata_key``.
Every row is checked when the file is read, before anything starts: a missing key or a wrong type
is one ``ConfigError`` naming the flag, the file and the line (Parquet: the row, 1-based).

Order: ``EpochOrder`` maps the data cursor (how many prompts were taken so far) to a row, epoch
after epoch; with shuffling each epoch is a permutation seeded by (seed, epoch). The order is a
pure function of the cursor, so the cursor alone (an int in every checkpoint) resumes it exactly,
mid-epoch or across an epoch boundary, with nothing else to save.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import msgspec

from runtime.core.errors import ConfigError


class PromptRow(msgspec.Struct, frozen=True):
    """One checked row. ``where``: ``file:line`` for messages that point back at it."""

    input: str | list[dict[str, Any]]
    label: str
    metadata: dict[str, Any]
    where: str


def read_rows(path: str | Path, *, input_key: str, label_key: str = "", metadata_key: str = "",
              flag: str = "--prompt-data") -> list[PromptRow]:
    """Every row of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file, checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(flag, f"{path} is not a file")
    raw = _parquet_rows(path, flag) if path.suffix == ".parquet" else _jsonl_rows(path, flag)
    rows = [_check_row(obj, where, input_key=input_key, label_key=label_key, metadata_key=metadata_key, flag=flag)
            for where, obj in raw]
    if not rows:
        raise ConfigError(flag, f"{path} has no rows")
    return rows


def _jsonl_rows(path: Path, flag: str) -> list[tuple[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(flag, f"{path}:{n}: not a JSON object ({e.msg})") from None
    return out


def _parquet_rows(path: Path, flag: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(flag, f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are many; the message is what matters
        raise ConfigError(flag, f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}:row {n}", obj) for n, obj in enumerate(table.to_pylist(), 1)]


def _check_row(obj: Any, where: str, *, input_key: str, label_key: str, metadata_key: str, flag: str) -> PromptRow:
    def bad(reason: str) -> ConfigError:
        return ConfigError(flag, f"{where}: {reason}")

    if not isinstance(obj, dict):
        raise bad(f"a row must be a JSON object, got {type(obj).__name__}")
    if input_key not in obj:
        raise bad(f"no key {input_key!r} (--input-key; the row has {sorted(obj)[:8]})")
    prompt = obj[input_key]
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise bad(f"{input_key!r} message {i} is not a {{role, content}} object of strings")
        if not prompt:
            raise bad(f"{input_key!r} is an empty list of messages")
    elif not isinstance(prompt, str) or not prompt:
        raise bad(f"{input_key!r} must be a non-empty string or a list of messages, got {type(prompt).__name__}")
    label = ""
    if label_key:
        if label_key not in obj:
            raise bad(f"no key {label_key!r} (--label-key)")
        label = obj[label_key]
        if isinstance(label, bool) or not isinstance(label, (str, int, float)):
            raise bad(f"{label_key!r} must be a string or a number, got {type(label).__name__}")
        label = str(label)
    metadata = obj.get(metadata_key) if metadata_key else None
    if isinstance(metadata, str):  # Miles writes metadata as a JSON string in some files
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise bad(f"{metadata_key!r} is a string that is not JSON") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise bad(f"{metadata_key!r} must be an object, got {type(metadata).__name__}")
    return PromptRow(input=prompt, label=label, metadata=metadata or {}, where=where)


class EpochOrder:
    """Cursor -> row index over ``n`` rows, epoch after epoch (module doc)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int):
        if n < 1:
            raise ValueError("no rows")
        self.n, self.shuffle, self.seed = n, shuffle, seed

    def epoch(self, cursor: int) -> int:
        return cursor // self.n

    def __call__(self, cursor: int) -> int:
        epoch, pos = divmod(cursor, self.n)
        return self._permutation(epoch)[pos] if self.shuffle else pos

    @functools.lru_cache(maxsize=2)  # noqa: B019 - the current epoch and the one before (a resume)
    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)  # a str seed: stable across runs and versions
        return order
