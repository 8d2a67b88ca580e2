"""preftune's own log lines: one handler on the ``preftune`` logger (never the root logger, so other
libraries' lines keep their own names and formats), info on rank 0 only under distributed runs."""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "preftune"


def rank() -> int:
    """This process's global rank under torchrun / accelerate (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; the other ranks only their warnings and errors, labelled with the rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        r = rank()
        record.rank_label = "" if r == 0 else f"[rank {r}]"
        return r == 0 or record.levelno >= logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the line (a redirected or captured stderr,
    as under pytest or a wrapping tool, is honoured; a handler bound to a closed stream is not kept)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Give the ``preftune`` logger its handler (stderr, ``preftune: message``); idempotent."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(getattr(h, "_preftune", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler._preftune = True
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("preftune%(rank_label)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # a root handler set by the user's own code would print our lines twice
    return logger
