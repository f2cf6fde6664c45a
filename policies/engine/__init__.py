"""Inference engines speaking the SGLang HTTP subset (see /work/shared/PROTOCOL.md).

Importing this package is cheap (no torch): it exposes the HTTP client and the process manager.
The embedded server itself lives in `policies.engine.server` and is run as a subprocess.
"""

from policies.engine.client import EngineClient, EngineError, EngineLost, GenerateOutput, WeightUpdateResult
from policies.engine.process import EngineProcess, EngineStartError

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineLost",
    "EngineProcess",
    "EngineStartError",
    "GenerateOutput",
    "WeightUpdateResult",
]
