"""User-facing errors.

A ``ConfigError`` is a mistake the user can fix (a bad key, a missing folder, a wrong model).
Entry points print its message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from typing import Iterable, Iterator

from difftrain import log

USER_ERROR_EXIT_CODE = 2


class ConfigError(Exception):
    """A user mistake: the message says what, where, and how to fix it."""


@contextmanager
def exit_on_user_error(program: str) -> Iterator[None]:
    """Turn a ConfigError into a one-paragraph message on stderr and exit code 2."""
    try:
        yield
    except ConfigError as error:
        log.say(f"{program}: error: {error}", level=logging.ERROR)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


def closest_matches(word: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """The candidates that look most like `word`, best first, as the candidates spell them.

    Case is ignored ('adamw' finds 'AdamW'). Whole names are compared first; then, for dot-paths
    (``2nd pass.train_learning_rate``), the last parts, so a typo deep in a path still finds the key
    it meant.
    """
    spelled: dict[str, str] = {}
    for name in candidates:
        spelled.setdefault(name.lower(), name)
    by_last_part: dict[str, str] = {}
    for lowered in spelled:
        by_last_part.setdefault(lowered.rsplit(".", 1)[-1], lowered)
    word = word.lower()
    whole = difflib.get_close_matches(word, list(spelled), n=limit, cutoff=0.6)
    last_parts = difflib.get_close_matches(word.rsplit(".", 1)[-1], list(by_last_part), n=limit, cutoff=0.6)
    found = dict.fromkeys(whole + [by_last_part[part] for part in last_parts])
    return [spelled[lowered] for lowered in found][:limit]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """The sentence ` Did you mean 'a' or 'b'?` naming the closest candidates; "" when none is close."""
    close = closest_matches(word, candidates)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{name}'" for name in close) + "?"
