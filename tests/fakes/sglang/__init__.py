"""FAKE sglang package for tests (tests/fakes/README.md): NOT SGLang. Only `launch_server` exists."""

FAKE = True
