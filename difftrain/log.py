"""How difftrain speaks to the user: the standard `logging` module, one handler, plain lines.

Every module logs through `logging.getLogger(__name__)` (a child of the "difftrain" logger), or
calls `say` for a line the user must see. `setup` is called once by each front door; it installs
the one handler, so a `--quiet`/`--verbose` flag or a log file is added here and nowhere else.
The progress bar stays tqdm's: it redraws one line in place, which a log record cannot do.
"""

from __future__ import annotations

import logging
import sys

ROOT = "difftrain"
logger = logging.getLogger(ROOT)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the moment of writing, not at the moment of setup:
    test runners and the launcher's output pump swap sys.stderr after the handler exists."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; we always follow sys.stderr
        pass


def setup(level: int = logging.INFO) -> None:
    """Install difftrain's one handler (idempotent): messages as they are, on stderr."""
    if not any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    # Our lines are not for the root logger's handlers (a user's basicConfig would print them twice).
    logger.propagate = False


def say(message: str, level: int = logging.INFO) -> None:
    """A line the user must see (progress notes, where files went, warnings already worded);
    errors pass level=logging.ERROR so that a quieter setup still shows them."""
    setup_if_needed()
    logger.log(level, message)
    for handler in logger.handlers:
        handler.flush()


def setup_if_needed() -> None:
    # Library code can run without a front door (tests, notebooks): speak anyway, at INFO.
    if not logger.handlers:
        setup()
