"""From plain values (recipe, TOML file, flags) to a checked ``Config``, and back to plain tables."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from runtime.config.checks import check
from runtime.config.compute import engine_defaults
from runtime.config.schema import SECTIONS, Config, flag
from runtime.core.errors import ConfigError


def merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Section-wise overlay of plain dicts; unknown sections raise with the section's name."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        if section not in SECTIONS:
            raise ConfigError(f"[{section}]", f"unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}]", "must be a table")
        out.setdefault(section, {}).update(values)
    return out


def build(data: dict[str, dict[str, Any]]) -> Config:
    """Validate plain values into a ``Config``; the first problem raises ``ConfigError``."""
    try:
        cfg = msgspec.convert(engine_defaults(data), Config, strict=False)
    except msgspec.ValidationError as e:
        raise _as_config_error(e) from None
    check(cfg)
    return cfg


def _as_config_error(e: msgspec.ValidationError) -> ConfigError:
    """Turn msgspec's ``reason - at `$.section.field``` into the flag a user would type."""
    reason, _, where = str(e).rpartition(" - at `")
    if not reason:
        reason, where = str(e), "$"
    parts = where.rstrip("`").split(".")[1:]
    unknown = re.search(r"unknown field `([^`]+)`", reason)
    if unknown and len(parts) == 0:
        return ConfigError(f"[{unknown.group(1)}]", f"unknown section (known: {', '.join(SECTIONS)})")
    if unknown and len(parts) == 1:
        return ConfigError(f"[{parts[0]}] {unknown.group(1)}", "unknown field")
    if len(parts) >= 2:
        return ConfigError(flag(parts[1].split("[")[0]), reason)  # sglang_args[...]: the table's flag
    return ConfigError(f"[{parts[0]}]" if parts else "config", reason)


def to_toml_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain tables (None values left out: TOML has no null)."""
    raw = msgspec.to_builtins(cfg)
    return {s: {k: v for k, v in t.items() if v is not None} for s, t in raw.items()}
