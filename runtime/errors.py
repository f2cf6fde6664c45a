"""The one error type that ends a run with a clear line instead of a traceback."""


class RunFailed(RuntimeError):
    """The run cannot go on; ``str()`` is the line the user sees (it may name a file with details)."""
