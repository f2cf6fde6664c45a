"""Plug-ins are loaded only from explicit ``module:function`` paths, never from code in config."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from runtime.config import ConfigError


def load_function(path: str, *, flag: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(flag, f"must be module:function, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - its own import errors too (a syntax error, a missing package, a raise)
        raise ConfigError(flag, f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(flag, f"{module_name!r} has no function {attr!r}")
    return fn
