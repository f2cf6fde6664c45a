"""The runtime's ground floor: plain bookkeeping every layer above may use (the ledger, wait
clocks, the trace, the errors that end a run). It imports nothing of this project above it:
no torch, no actors, no wiring (tests/test_layers.py enforces it)."""
