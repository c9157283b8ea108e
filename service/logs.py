"""Logging helpers shared by the CLI and the app."""
from __future__ import annotations

import logging
import sys


def warn_always(log: logging.Logger, message: str) -> None:
    """A warning an operator must see even at `--log-level error` (auth off, a mistyped setting):
    logged when warnings are, else printed to stderr."""
    if log.isEnabledFor(logging.WARNING):
        log.warning("%s", message)
    else:
        print(f"WARNING {message}", file=sys.stderr, flush=True)
