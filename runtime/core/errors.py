"""The errors that end a run with one clear line instead of a traceback."""


class RunFailed(RuntimeError):
    """The run cannot go on; ``str()`` is the line the user sees (it may name a file with details)."""


class ConfigError(ValueError):
    """A bad value, with the flag it came from: ``str()`` is the one line the user sees. Raised by
    any layer that validates what a user gave it (config, recipes, plug-ins); the CLI exits 2."""

    def __init__(self, flag: str, reason: str):
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason
