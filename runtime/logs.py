"""The run's log: everything to ``run.log``; warnings also to the terminal, which otherwise gets progress."""

from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(run_dir: Path) -> None:
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(run_dir / "run.log"), terminal], force=True)
