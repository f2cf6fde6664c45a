"""The Megatron-core learner backend (``--train-backend megatron``): optional, behind the
``megatron`` extra. Nothing outside this package imports megatron-core; import these modules only
once ``available()`` is true (the trainer host does so when the flag selects this backend)."""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None
