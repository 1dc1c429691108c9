"""User-facing errors.

A ``ConfigError`` is a mistake the user can fix (a bad key, a missing folder, a wrong model).
Entry points print its message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

USER_ERROR_EXIT_CODE = 2


class ConfigError(Exception):
    """A user mistake: the message says what, where, and how to fix it."""


@contextmanager
def exit_on_user_error(program: str) -> Iterator[None]:
    """Turn a ConfigError into a one-paragraph message on stderr and exit code 2."""
    try:
        yield
    except ConfigError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
