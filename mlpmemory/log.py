"""Progress and status messages through :mod:`logging` (logger ``mlpmemory``), on stderr.

Why a module of its own: every stage reports what it did (``datastore: done in 12.3s``), and a
user scripting the CLI wants ``--quiet``, a user debugging wants ``--verbose``; library users
configure the ``mlpmemory`` logger like any other. The handler looks up ``sys.stderr`` at each
message, so redirected or captured stderr (pytest, notebooks) receives it.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("mlpmemory")


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a message is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns it; the property always wins
        pass


def configure(verbosity: int = 0) -> None:
    """CLI logging: -1 quiet (warnings only), 0 normal (progress lines), 1 verbose (debug)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("[mlpmemory] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def log(msg: str) -> None:
    """One progress line (INFO)."""
    logger.info(msg)


configure(0)  # library use prints progress lines too; the CLI's --quiet / --verbose change the level
