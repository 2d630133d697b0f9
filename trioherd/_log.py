"""Logging set-up shared by the primary and the workers: one line per record on stderr,
tagged with who wrote it (``primary`` or ``w<id>``)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, tag: str) -> None:
    root = logging.getLogger("trioherd")
    for handler in list(root.handlers):
        if getattr(handler, "_trioherd", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._trioherd = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s trioherd[{tag}] %(levelname)s %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
